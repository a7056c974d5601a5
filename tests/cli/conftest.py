"""Fixtures shared by the CLI tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.test_export import make_msd


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory) -> Path:
    return make_msd(tmp_path_factory.mktemp("real") / "Task04_Hippocampus")


@pytest.fixture(scope="session")  # used by test_sample.py and test_preview.py: one run
def sampled(tiny_model_dir, tmp_path_factory):
    """``duodiff sample`` run once through the installed console script."""
    out = tmp_path_factory.mktemp("cli") / "synthetic"
    proc = run_cli(["sample", "-m", str(tiny_model_dir), "-n", "3", "--out", str(out), "--steps", "2", "--seed",
                    "5", "--no-progress"], script=True)
    assert proc.returncode == 0, proc.stderr
    return out, proc

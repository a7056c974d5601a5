"""Fixtures shared by the CLI tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_export import make_msd


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory) -> Path:
    return make_msd(tmp_path_factory.mktemp("real") / "Task04_Hippocampus")

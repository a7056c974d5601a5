"""Shared fixtures: one tiny randomised pipeline and its saved folder per test session.

Building and saving is cheap (< 1 s) but many tests need the same model, so it is made once.
Tests must not modify these objects in place; copy them (``copy.deepcopy``) if they need to.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pytest

from duodiff import DuoDiffusion
from duodiff.testing import randomize_weights
from duodiff.threads import intra_op_threads

# dtype="auto" (the default of sample(), the dataset and the CLI) times the machine on first use: the suite pins
# it to float32 so that results never depend on timing, and keeps its cache out of the user's cache folder. Set
# here, at import, so subprocesses (CLI, torchrun, spawned workers) inherit both. Tests of "auto" itself unset
# the pin and use their own tmp_path cache (tests/test_precision.py).
os.environ["DUODIFF_AUTO_DTYPE"] = "float32"
os.environ["DUODIFF_CACHE"] = tempfile.mkdtemp(prefix="duodiff-test-cache-")
atexit.register(shutil.rmtree, os.environ["DUODIFF_CACHE"], ignore_errors=True)

#: Real data shared by the project (tests that need it skip when it is absent).
DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"

#: Fake commit hash used for pre-filled Hugging Face caches.
FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_tiny(num_classes: int = 3, *, seed: int = 0, **kwargs) -> DuoDiffusion:
    """``from_preset("tiny")`` with randomised weights (a fresh UNet outputs exactly 0)."""
    pipe = DuoDiffusion.from_preset("tiny", num_classes=num_classes, init_seed=seed, **kwargs)
    return randomize_weights(pipe, seed=seed)


@pytest.fixture()
def one_thread():
    """Run a test with one intra-op thread (small convolutions are faster so on a busy 2-core machine)."""
    with intra_op_threads(1):
        yield


@pytest.fixture(scope="session")
def tiny_pipe() -> DuoDiffusion:
    """A tiny 3-class pipeline (16^3 volumes) with randomised weights. Do not modify it."""
    return make_tiny(3, spacing=(1.5, 0.75, 2.0), label_names=("background", "anterior", "posterior"))


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_pipe: DuoDiffusion, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_pipe`` saved with ``save_pretrained`` (fp32 and fp16 variants). Do not modify it."""
    path = tmp_path_factory.mktemp("models") / "tiny"
    tiny_pipe.save_pretrained(path)
    tiny_pipe.save_pretrained(path, variant="fp16")
    return path


def fill_hf_cache(model_dir: Path, cache_dir: Path, repo_id: str, *, commit: str = FAKE_COMMIT,
                  ref: str = "main") -> Path:
    """Lay out ``model_dir`` as a Hugging Face cache entry for ``repo_id`` (what a download leaves behind).

    ``<cache>/models--org--name/refs/<ref>`` holds the commit hash and
    ``<cache>/models--org--name/snapshots/<commit>/`` holds the files (plain copies, not symlinks).
    """
    import shutil

    repo_folder = cache_dir / ("models--" + repo_id.replace("/", "--"))
    (repo_folder / "refs").mkdir(parents=True, exist_ok=True)
    (repo_folder / "refs" / ref).write_text(commit)
    snapshot = repo_folder / "snapshots" / commit
    shutil.copytree(model_dir, snapshot)
    return snapshot


def error_lines(stderr: str) -> list[str]:
    """``stderr`` without the phase announcements of long commands (``loading model from ... ...``: lines ending in
    ``" ..."``, shown unless ``--no-progress``): what a one-line error report must reduce to."""
    return [line for line in stderr.strip().splitlines() if not line.endswith(" ...")]


def offline_env(**extra: str) -> dict[str, str]:
    """Environment for subprocesses: Hub offline, one thread."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def run_python(code: str, *, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run ``python -c code`` in a fresh interpreter (so import-time env vars take effect).

    The generous timeout only guards against hangs: on a shared, oversubscribed machine a bare
    ``import duodiff`` has been seen to take minutes of wall time.
    """
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env=env or offline_env())


def run_cli(args: Sequence[str], *, script: bool = False, env: dict[str, str] | None = None,
            timeout: float = 900) -> subprocess.CompletedProcess:
    """Run the real ``duodiff`` CLI in a subprocess.

    Args:
        args: arguments after ``duodiff``.
        script: use the installed ``duodiff`` console script instead of ``python -m duodiff.cli.main``.
    """
    import shutil

    if script:
        exe = shutil.which("duodiff") or str(Path(sys.executable).with_name("duodiff"))
        if not Path(exe).exists():
            pytest.fail("the `duodiff` console script is not installed next to this Python; pip install -e .")
        cmd = [exe, *args]
    else:
        cmd = [sys.executable, "-m", "duodiff.cli.main", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or offline_env())

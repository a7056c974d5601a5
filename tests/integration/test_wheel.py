"""The package as users install it: a wheel built from this repository, run outside the source checkout.

Issue 15 asks that the installed package works from a wheel with every CLI command (no reaching into
``benchmarks/`` or ``tests/`` of a checkout) and that the bundled model travels with it. The wheel is built
without build isolation (setuptools comes with the ``test`` extra) and installed with ``pip --target`` into a
temporary folder that comes first on ``PYTHONPATH``, so its copy, not the editable checkout, is imported.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import pytest

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ("sample", "info", "preview", "evaluate", "export", "convert", "train", "bench")
BUNDLED = ("model_index.json", "README.md", "training_cases.json")


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory) -> tuple[Path, Path]:
    """``(wheel file, folder it was installed into)``."""
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools (the test extra installs it)")
    tmp = tmp_path_factory.mktemp("wheel")
    run = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"),
         str(ROOT)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    (wheel,) = (tmp / "dist").glob("duodiff-*.whl")
    site = tmp / "site"
    run = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    return wheel, site


def _duodiff(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    code = "import sys; from duodiff.cli.main import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_wheel_holds_the_bundled_model_and_no_tests(wheel_site):
    wheel, _ = wheel_site
    names = zipfile.ZipFile(wheel).namelist()
    weights = [n for n in names if n.startswith("duodiff/weights/hippocampus/")]
    assert sum(n.endswith(".safetensors") for n in weights) == 5, weights
    for name in BUNDLED:
        assert f"duodiff/weights/hippocampus/{name}" in names
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/"))]


def test_installed_copy_is_the_one_imported(wheel_site, tmp_path):
    _, site = wheel_site
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", "import duodiff; print(duodiff.__file__)"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).is_relative_to(site)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_runs_from_the_wheel(wheel_site, tmp_path, command):
    _, site = wheel_site
    out = _duodiff(site, tmp_path, command, "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: duodiff {command}"), out.stdout[:200]


def test_sample_from_the_wheel_writes_valid_nifti(wheel_site, tmp_path):
    _, site = wheel_site
    out = _duodiff(site, tmp_path, "sample", "-n", "1", "--steps", "2", "--dtype", "float32", "--threads", "1",
                   "--no-progress", "--out", "pairs")
    assert out.returncode == 0, out.stderr
    images = sorted((tmp_path / "pairs" / "imagesTr").glob("*.nii.gz"))
    labels = sorted((tmp_path / "pairs" / "labelsTr").glob("*.nii.gz"))
    assert len(images) == 1 and len(labels) == 1
    img, lab = nib.load(images[0]), nib.load(labels[0])
    assert img.shape[:3] == lab.shape[:3] == (32, 48, 32)
    assert (img.affine == lab.affine).all()

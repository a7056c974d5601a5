"""Crash safety: a real ``duodiff sample`` process is SIGKILLed mid-run, then resumed with ``--resume``.

Every file is written to a hidden temporary name and renamed into place, so a kill leaves either a
complete file or none. After resuming, each of the 100 cases must exist exactly once, load with
nibabel and equal what an uninterrupted run makes for its seed.
(The training kill-and-resume test lives with the trainer's tests.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from duodiff import DuoDiffusion
from duodiff.output import sample_name
from tests.conftest import offline_env

N = 100
STEPS = 2
SUFFIX = ".nii.gz"


def _sample_cmd(model: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "duodiff.cli.main", "sample", "--model", str(model), "-n", str(N), "--out",
            str(out), "--steps", str(STEPS), "--batch-size", "2", "--no-progress", *extra]


def _visible_labels(out: Path) -> int:
    folder = out / "labelsTr"
    if not folder.is_dir():
        return 0
    return sum(1 for n in os.listdir(folder) if n.endswith(SUFFIX) and not n.startswith("."))


def _kill_after(cmd: list[str], out: Path, at_least: int, timeout: float = 240) -> int:
    """Start ``cmd``, SIGKILL it once ``at_least`` label files exist; returns the count seen at the kill."""
    proc = subprocess.Popen(cmd, env=offline_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                pytest.fail(f"`duodiff sample` ended (rc={proc.returncode}) before it could be killed: {err[-2000:]}")
            count = _visible_labels(out)
            if count >= at_least:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
                assert proc.returncode == -signal.SIGKILL
                return count
            time.sleep(0.005)
        pytest.fail(f"no {at_least} label files after {timeout} s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


@pytest.mark.parametrize("kills", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_sigkill_then_resume_gives_every_case_once(tiny_model_dir: Path, tmp_path: Path, kills: int):
    """``kills`` SIGKILLs (the second one hits a resumed run), then a final ``--resume`` run.

    One kill: two real processes (~10-20 s on 2 cores); two kills (slow): three processes.
    """
    out = tmp_path / "synthetic"
    first = _kill_after(_sample_cmd(tiny_model_dir, out), out, at_least=15)
    second = first
    if kills == 2:
        second = _kill_after(_sample_cmd(tiny_model_dir, out, "--resume"), out, at_least=first + 20)
    assert first <= second < N
    done = subprocess.run(_sample_cmd(tiny_model_dir, out, "--resume"), env=offline_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "already there" in done.stderr

    names = [sample_name(s) for s in range(N)]
    expected_files = {"imagesTr": [f"{n}_0000{SUFFIX}" for n in names], "labelsTr": [f"{n}{SUFFIX}" for n in names]}
    for sub, expected in expected_files.items():
        # exactly the expected NIfTI files (pathlib's glob also matches hidden names): none missing or duplicated
        assert sorted(p.name for p in (out / sub).glob(f"*{SUFFIX}")) == sorted(expected)
        # a write cut by SIGKILL may leave only a hidden '.<name>.<random>.tmp' file, which no reader globs
        leftovers = [n for n in os.listdir(out / sub) if not n.endswith(SUFFIX)]
        assert all(n.startswith(".") and n.endswith(".tmp") for n in leftovers), leftovers
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == N
    shape = (16, 16, 16)
    for n in names:
        img = nib.load(out / "imagesTr" / f"{n}_0000{SUFFIX}")
        lab = nib.load(out / "labelsTr" / f"{n}{SUFFIX}")
        img_data, lab_data = np.asarray(img.dataobj), np.asarray(lab.dataobj)  # raises on truncated files
        assert img_data.shape == shape and lab_data.shape == shape
        assert np.isfinite(img_data).all() and 0 <= img_data.min() and img_data.max() <= 1
        assert set(np.unique(lab_data)) <= {0, 1, 2}
    # cases written around each kill are the ones an uninterrupted run makes for those seeds
    pipe = DuoDiffusion.from_pretrained(tiny_model_dir)
    seeds = sorted({0, first - 1, first, second - 1, second, N - 1})
    ref = pipe.sample(len(seeds), seed=seeds, num_inference_steps=STEPS, progress=False)
    for i, s in enumerate(seeds):
        img = np.asarray(nib.load(out / "imagesTr" / f"{sample_name(s)}_0000{SUFFIX}").dataobj)
        lab = np.asarray(nib.load(out / "labelsTr" / f"{sample_name(s)}{SUFFIX}").dataobj)
        np.testing.assert_allclose(img, ref.images[i, 0].numpy(), atol=1e-4)
        assert (lab != ref.labels[i, 0].numpy()).mean() <= 1e-3

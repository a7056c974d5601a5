"""Multi-process generation: seed sharding, and a real 2-process torchrun (gloo, CPU) into one folder."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from duodiff.distributed import DistributedContext, env_world, finalize_folder, shard_seeds
from duodiff.io import read_nifti
from duodiff.output import sample_name
from duodiff.testing import tiny_pipeline


@settings(deadline=None)  # the machine is shared: no per-example time limit
@given(st.lists(st.integers(0, 10**9), unique=True, max_size=60), st.integers(1, 9))
def test_shards_are_disjoint_complete_and_balanced(seeds, world):
    shards = [shard_seeds(seeds, r, world) for r in range(world)]
    flat = [s for sh in shards for s in sh]
    assert sorted(flat) == sorted(seeds) and len(flat) == len(set(flat))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.parametrize("rank, world", [(2, 2), (-1, 2), (0, 0)])
def test_bad_rank_or_world_size(rank, world):
    with pytest.raises(ValueError, match="rank"):
        shard_seeds(range(4), rank, world)


def test_env_world(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert env_world() == (0, 1, 0)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert env_world() == (3, 4, 1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="inconsistent"):
        env_world()
    monkeypatch.setenv("WORLD_SIZE", "x")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        env_world()


def test_each_rank_gets_its_own_gpu():
    ctx = DistributedContext(rank=3, world_size=4, local_rank=1)
    assert ctx.device("cuda") == "cuda:1"
    assert ctx.device("cuda:0") == "cuda:0" and ctx.device("cpu") == "cpu"
    assert DistributedContext().device("cuda") == "cuda"


def test_finalize_folder_counts_label_files(tmp_path):
    (tmp_path / "labelsTr").mkdir()
    for name in ("a", "b", "c"):
        (tmp_path / "labelsTr" / f"{name}.nii.gz").write_bytes(b"")
    (tmp_path / "dataset.json").write_text(json.dumps({"numTraining": 2, "name": "x"}))
    assert finalize_folder(tmp_path) == 3
    assert json.loads((tmp_path / "dataset.json").read_text()) == {"numTraining": 3, "name": "x"}


# ------------------------------------------------------------------------------------- torchrun, 2 ranks
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    tiny_pipeline().save_pretrained(path)
    return path


def _torchrun_sample(model: Path, out: Path, *extra: str) -> dict[int, int]:
    """``torchrun --nproc_per_node=2 duodiff sample`` (gloo on CPU); returns pairs written per rank."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "duodiff.cli.main", "sample", "--model", str(model), "-n", "5", "--seed", "100", "--out", str(out),
        "--steps", "2", "--batch-size", "2", "--no-progress", *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = re.findall(r"rank (\d)/2: wrote (\d+) pair", proc.stderr)
    assert len(found) == 2, proc.stderr[-4000:]
    return {int(r): int(n) for r, n in found}


def _cases(out: Path) -> tuple[list[str], list[str]]:
    labels = sorted(p.name for p in (out / "labelsTr").glob("*.nii.gz"))
    images = sorted(p.name for p in (out / "imagesTr").glob("*.nii.gz"))
    return labels, images


def test_two_gloo_ranks_write_every_seed_once_and_resume(model_dir, tmp_path):
    out = tmp_path / "synth"
    expected = [sample_name(s) for s in range(100, 105)]

    # 1. two processes share the 5 seeds: rank 0 takes 100, 102, 104 and rank 1 takes 101, 103
    written = _torchrun_sample(model_dir, out, "--distributed", "--decode-tile-size", "none")
    labels, images = _cases(out)
    assert labels == [f"{n}.nii.gz" for n in expected]
    assert images == [f"{n}_0000.nii.gz" for n in expected]
    assert written == {0: 3, 1: 2}  # 5 writes for 5 distinct files: no seed was made twice
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 5

    # a case does not depend on which rank or batch made it
    lab, _ = read_nifti(out / "labelsTr" / f"{sample_name(103)}.nii.gz")
    alone = tiny_pipeline().sample(1, seed=103, num_inference_steps=2, progress=False)
    assert torch.equal(torch.as_tensor(lab).long(), alone.labels[0, 0])

    # 2. lose one case of each rank, resume (torchrun is detected without --distributed)
    for seed in (100, 103):
        (out / "labelsTr" / f"{sample_name(seed)}.nii.gz").unlink()
        (out / "imagesTr" / f"{sample_name(seed)}_0000.nii.gz").unlink()
    written = _torchrun_sample(model_dir, out, "--resume")
    assert written == {0: 1, 1: 1}
    assert _cases(out) == (labels, images)
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 5

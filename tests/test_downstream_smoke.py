"""Smoke test of benchmarks/downstream.py: tiny model, phantom MSD folder, 2 training steps per run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from duodiff.io import spacing_affine, write_json, write_nifti
from duodiff.testing import phantom_pair, tiny_pipeline

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load_downstream():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("downstream", BENCH / "downstream.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("downstream")
    model = root / "model"
    tiny_pipeline(3).save_pretrained(model)
    data = root / "msd"
    (data / "imagesTr").mkdir(parents=True)
    (data / "labelsTr").mkdir()
    names = [f"case_{i:03d}" for i in range(8)]
    for i, name in enumerate(names):
        image, label = phantom_pair((18, 20, 17), num_classes=3, seed=i)
        write_nifti(data / "imagesTr" / f"{name}.nii.gz", image, spacing_affine((1, 1, 1)))
        write_nifti(data / "labelsTr" / f"{name}.nii.gz", label, spacing_affine((1, 1, 1)))
    write_json(data / "dataset.json", {"labels": {"0": "background", "1": "a", "2": "b"}})
    split = root / "split.json"
    split.write_text(json.dumps({"train": names[:5], "val": [], "test": names[5:]}))
    return _load_downstream(), root, model, data, split


def _argv(root, model, data, split, out, *extra):
    return ["--model", str(model), "--data", str(data), "--split", str(split), "--out", str(out),
            "--synthetic-dir", str(root / "pool"), "--cache-dir", str(root / "cache"), "--steps", "2",
            "--batch-size", "2", "--num-synthetic", "4", "--gen-steps", "2", "--seeds", "0",
            "--no-progress", *extra]


def test_runs_all_conditions_and_resumes(setup, capsys):
    ds, root, model, data, split = setup
    out = root / "results.json"
    argv = _argv(root, model, data, split, out, "--networks", "unet", "--regimes", "2", "all",
                 "--fractions", "0.5")
    results = ds.main(argv)
    keys = set(results["runs"])
    assert keys == {"unet/n2/real/s0", "unet/n2/mix0.5/s0", "unet/n5/real/s0", "unet/n5/mix0.5/s0",
                    "unet/n0/synth/s0"}
    for run in results["runs"].values():
        assert 0.0 <= run["mean"] <= 1.0 and len(run["per_class"]) == 2 and len(run["per_case"]) == 3
    shares = {k: r["synthetic_share_seen"] for k, r in results["runs"].items()}
    assert shares["unet/n2/real/s0"] == 0.0 and shares["unet/n0/synth/s0"] == 1.0
    assert shares["unet/n2/mix0.5/s0"] == 0.5
    saved = json.loads(out.read_text())
    assert set(saved["runs"]) == keys
    assert len(list((root / "pool" / "labelsTr").glob("*.nii.gz"))) == 4
    md = out.with_suffix(".md").read_text()
    assert "| UNet | 2 | 50% |" in md and out.with_suffix(".png").stat().st_size > 1000
    # Resume: nothing new is trained; the saved runs are kept as they are.
    capsys.readouterr()
    again = ds.main(argv)
    assert "0 new runs" in capsys.readouterr().out
    assert again["runs"] == saved["runs"]
    # Other settings are refused instead of mixing incomparable runs in one file.
    with pytest.raises(ValueError, match="other settings"):
        ds.main(_argv(root, model, data, split, out, "--networks", "unet", "--regimes", "2", "--lr", "0.1"))


def test_networks_build_and_runs_are_seeded(setup):
    ds, *_ = setup
    images = torch.rand(4, 1, 16, 16, 16)
    labels = torch.from_numpy(np.stack([phantom_pair((16, 16, 16), seed=i)[1][None] for i in range(4)]))
    real = ds.as_items(images, labels)
    state = torch.random.get_rng_state()
    for net in ds.NETWORKS:
        kw = dict(num_classes=3, steps=2, batch_size=2, lr=1e-3, progress=False)
        a = ds.run_one(net, "real", 3, real, [], images, labels, **kw)
        b = ds.run_one(net, "real", 3, real, [], images, labels, **kw)
        assert a["per_case"] == b["per_case"] and a["final_loss"] == b["final_loss"]
    assert torch.equal(state, torch.random.get_rng_state())  # no global seeding
    with pytest.raises(ValueError, match="divisible by 16"):
        ds.build_network("vnet", in_channels=1, out_channels=3, volume_shape=(32, 40, 32))
    with pytest.raises(ValueError, match="not possible"):
        ds.real_subset(5, 6, 0)


def test_a_diverged_run_fails_loudly_instead_of_scoring_zero(setup):
    """A NaN loss (e.g. bf16 VNet on CPU) must stop the run, not be recorded as Dice 0."""
    ds, *_ = setup
    images = torch.rand(2, 1, 16, 16, 16)
    images[0, 0, 0, 0, 0] = float("nan")
    labels = torch.from_numpy(np.stack([phantom_pair((16, 16, 16), seed=i)[1][None] for i in range(2)]))
    with pytest.raises(FloatingPointError, match="loss became nan"):
        ds.run_one("unet", "real", 0, ds.as_items(images, labels), [], images, labels, num_classes=3, steps=2,
                   batch_size=2, lr=1e-3, progress=False)


def test_vnet_dropout_option(setup):
    ds, *_ = setup
    probs = lambda net: sorted({m.p for m in net.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)})  # noqa: E731
    assert probs(ds.build_network("vnet", in_channels=1, out_channels=3, volume_shape=(16, 16, 16))) == [0.5]
    assert probs(ds.build_network("vnet", in_channels=1, out_channels=3, volume_shape=(16, 16, 16),
                                  vnet_dropout=0.0)) == [0.0]

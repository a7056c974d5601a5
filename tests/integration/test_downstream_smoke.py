"""Smoke tests of benchmarks/downstream.py: tiny model, phantom MSD folder, 2-6 training steps per run."""

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

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load_downstream():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("downstream", BENCH / "downstream.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["downstream"] = module  # dataclasses resolve their module; downstream_report imports it by name
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
    names = [f"case_{i:03d}" for i in range(10)]
    for i, name in enumerate(names):
        image, label = phantom_pair((18, 20, 17), num_classes=3, seed=i)
        write_nifti(data / "imagesTr" / f"{name}.nii.gz", image, spacing_affine((1, 1, 1)))
        write_nifti(data / "labelsTr" / f"{name}.nii.gz", label, spacing_affine((1, 1, 1)))
    write_json(data / "dataset.json", {"labels": {"0": "background", "1": "a", "2": "b"}})
    split = root / "split.json"
    split.write_text(json.dumps({"train": names[:5], "val": [], "test": names[5:8]}))
    # the same train / test cases plus two val cases (early stopping); a model "trained" on 3 of the train cases
    (root / "split_val.json").write_text(json.dumps({"train": names[:5], "val": names[8:], "test": names[5:8]}))
    (model / "training_cases.json").write_text(json.dumps({"train": [names[1], names[3], names[4]], "val": []}))
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
    assert "| UNet | msd | 2 | mix 50% |" in md and out.with_suffix(".png").stat().st_size > 1000
    assert "| UNet | 2 | mix0.5 | 2 | — | 2 | 2 | 4 |" in md  # exposure: steps, best step, real / synthetic seen
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
    # "unet" (the name of earlier results files) is the paper's ResUNet: the same network, the same init
    nets = []
    for name in ("unet", "resunet"):
        torch.manual_seed(0)
        nets.append(ds.build_network(name, in_channels=1, out_channels=3, volume_shape=(16, 16, 16)))
    assert all(torch.equal(a, b) for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values()))
    assert any(m.__class__.__name__ == "ResidualUnit" for m in nets[1].modules())
    assert type(ds.build_network("segresnet", in_channels=1, out_channels=3, volume_shape=(16, 16, 16))).__name__ \
        == "SegResNet"
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


def _tiny_arrays(n: int, seed: int = 0):
    images = torch.rand(n, 1, 16, 16, 16, generator=torch.Generator().manual_seed(seed))
    labels = torch.from_numpy(np.stack([phantom_pair((16, 16, 16), seed=seed + i)[1][None] for i in range(n)]))
    return images, labels


def test_conditions_parse_to_canonical_names(setup):
    ds, *_ = setup
    assert ds.parse_condition("mix0.50") == ds.Condition("mix0.5", "mix", 0.5)
    assert ds.parse_condition("qcmix0.25") == ds.Condition("qcmix0.25", "qcmix", 0.25)
    assert ds.parse_condition("pretrain").fraction is None and ds.parse_condition("synth").fraction == 1.0
    for bad in ("mix1", "mix0", "qcmix", "mixed", "pre-train"):
        with pytest.raises(ValueError, match="Unknown condition"):
            ds.parse_condition(bad)
    assert ds.plan(["resunet"], [2], [0], ["real", "pretrain", "qcmix0.5", "synth"]) == [
        ("resunet", 2, "real", 0), ("resunet", 2, "pretrain", 0), ("resunet", 2, "qcmix0.5", 0),
        ("resunet", 0, "synth", 0)]


def test_early_stopping_stops_and_tests_the_restored_best_weights(setup, monkeypatch):
    """An injected val sequence peaks at step 2; with patience 2 training stops at step 4 and the test Dice is
    computed from the weights of step 2, not those of step 4."""
    ds, *_ = setup
    images, labels = _tiny_arrays(4)
    scores = iter([0.1, 0.5, 0.3, 0.2, 0.9, 0.9])
    states = {}

    def validate(net):
        states[len(states) + 1] = {k: v.detach().clone() for k, v in net.state_dict().items()}
        return next(scores)

    tested = {}
    real_evaluate = ds.evaluate

    def spy(net, *args, **kwargs):
        tested.update({k: v.detach().clone() for k, v in net.state_dict().items()})
        return real_evaluate(net, *args, **kwargs)

    monkeypatch.setattr(ds, "evaluate", spy)
    es = ds.EarlyStopping(max_steps=6, val_every=1, patience=2)
    run = ds.run_one("resunet", "real", 0, ds.as_items(images, labels), [], images, labels, num_classes=3, steps=99,
                     batch_size=2, lr=1e-2, progress=False, early_stopping=es, validate=validate)
    assert run["steps_trained"] == 4 and run["best_step"] == 2 and run["stopped_early"]
    assert run["best_step"] <= run["steps_trained"]
    assert run["val_curve"] == [[1, 0.1], [2, 0.5], [3, 0.3], [4, 0.2]] and run["best_val"] == 0.5
    assert run["real_seen"] == 8 and run["synthetic_seen"] == 0
    assert all(torch.equal(tested[k], states[2][k]) for k in tested)
    assert not all(torch.equal(tested[k], states[4][k]) for k in tested)  # training moved on after step 2
    # The fixed-steps protocol trains exactly `steps` and records no checkpoint.
    fixed = ds.run_one("resunet", "real", 0, ds.as_items(images, labels), [], images, labels, num_classes=3,
                       steps=3, batch_size=2, lr=1e-3, progress=False)
    assert fixed["steps_trained"] == 3 and "best_step" not in fixed
    with pytest.raises(ValueError, match="validation cases"):
        ds.run_one("resunet", "real", 0, ds.as_items(images, labels), [], images, labels, num_classes=3, steps=3,
                   batch_size=2, lr=1e-3, progress=False, early_stopping=es)
    with pytest.raises(ValueError, match="max_steps"):
        ds.EarlyStopping(max_steps=0, val_every=1, patience=1)


def test_qc_filter_drops_inconsistent_pairs(setup):
    """A judge that reads the label off the image: pairs whose image shows the label pass, blank images fail."""
    ds, *_ = setup
    _, labels = _tiny_arrays(4)

    class Judge(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot((x[:, 0] * 2).round().long(), 3).movedim(-1, 1).float()

    pool = [{"image": labels[i].float() / 2 if i % 2 == 0 else torch.zeros(1, 16, 16, 16), "label": labels[i],
             "is_synthetic": True, "seed": i} for i in range(4)]
    kept, info = ds.qc_filter(pool, [], num_classes=3, threshold=0.5, segmenter_steps=1, seed=0, segmenter=Judge(),
                              val_images=labels.float() / 2, val_labels=labels, progress=False)
    assert [k["seed"] for k in kept] == [0, 2] and info["qc_pool"] == 2 and info["qc_pool_total"] == 4
    assert info["qc_segmenter_val_dice"] == pytest.approx(1.0) and info["qc_dice_mean"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="lower --qc-threshold"):
        ds.qc_filter(pool[1::2], [], num_classes=3, threshold=0.5, segmenter_steps=1, seed=0, segmenter=Judge(),
                     progress=False)


def test_converged_protocol_with_pretrain_qc_and_new_networks(setup):
    """Early stopping on the val cases, the pretrain and qcmix conditions, ResUNet and SegResNet, through main,
    with the real cases drawn from the model's training_cases.json."""
    ds, root, model, data, split = setup
    out = root / "converged.json"
    argv = ["--model", str(model), "--data", str(data), "--split", str(root / "split_val.json"), "--out", str(out),
            "--synthetic-dir", str(root / "pool"), "--cache-dir", str(root / "cache"), "--batch-size", "2",
            "--num-synthetic", "4", "--gen-steps", "2", "--seeds", "0", "--no-progress", "--networks", "resunet",
            "segresnet", "--regimes", "2", "--conditions", "real", "pretrain", "qcmix0.5", "--early-stopping",
            "--max-steps", "4", "--val-every", "2", "--patience", "1", "--subset", "model", "--qc-steps", "2",
            "--qc-threshold", "0"]
    results = ds.main(argv)
    assert set(results["runs"]) == {f"{n}/n2/{c}/s0" for n in ("resunet", "segresnet")
                                    for c in ("real", "pretrain", "qcmix0.5")}
    s = results["settings"]
    assert s["early_stopping"] and s["steps"] is None and s["num_val_cases"] == 2 and s["subset"] == "model"
    for run in results["runs"].values():
        assert 1 <= run["best_step"] <= run["steps_trained"] and run["val_curve"]
        assert set(run["real_cases"]) <= {"case_001", "case_003", "case_004"} and len(run["real_cases"]) == 2
    real, pre, qc = (results["runs"][f"resunet/n2/{c}/s0"] for c in ("real", "pretrain", "qcmix0.5"))
    assert real["steps_trained"] <= 4 and real["synthetic_seen"] == 0 and real["real_seen"] == 2 * real["steps_trained"]
    assert 1 <= pre["pretrain_steps"] <= 4 and pre["pretrain_steps"] < pre["steps_trained"] <= 8
    assert pre["best_step"] > pre["pretrain_steps"]  # the restored weights are fine-tuned ones
    assert pre["synthetic_seen"] == 2 * pre["pretrain_steps"] and pre["real_seen"] > 0
    assert qc["qc_pool"] == qc["qc_pool_total"] == 4 and qc["fraction"] == 0.5  # threshold 0 keeps every pair
    assert real["real_cases"] == pre["real_cases"] == qc["real_cases"]  # paired
    md = out.with_suffix(".md").read_text()
    assert "early stopping on the 2 val cases" in md and "| SegResNet | msd | 2 | pre-train" in md
    assert "QC-filtered mix 50% (Dice ≥ 0)" in md and "4 of 4 (QC)" in md
    assert out.with_suffix(".png").stat().st_size > 1000
    with pytest.raises(ValueError, match="other settings"):  # another patience is another protocol
        ds.main([*argv, "--patience", "2"])
    with pytest.raises(ValueError, match="no 'val' cases"):
        ds.main(_argv(root, model, data, split, root / "x.json", "--early-stopping", "--regimes", "2"))


def test_results_from_before_the_new_settings_still_resume(setup, capsys):
    """A file written before early stopping / pretrain / qcmix existed (no such settings, no exposure fields)
    resumes under the fixed-steps protocol and takes new conditions; the early-stopping protocol is refused."""
    ds, root, model, data, split = setup
    out = root / "old.json"
    argv = _argv(root, model, data, split, out, "--networks", "unet", "--regimes", "2", "--no-synthetic-only")
    ds.main(argv)
    old = json.loads(out.read_text())
    for k in ("early_stopping", "max_steps", "val_every", "patience", "subset", "pretrain_share", "qc_threshold",
              "qc_steps", "num_val_cases", "vnet_dropout"):
        del old["settings"][k]
    for run in old["runs"].values():
        for k in ("steps_trained", "real_seen", "synthetic_seen", "real_cases"):
            del run[k]
    out.write_text(json.dumps(old))
    capsys.readouterr()
    assert ds.main(argv)["runs"] == old["runs"] and "0 new runs" in capsys.readouterr().out
    md = out.with_suffix(".md").read_text()
    assert "| UNet | 2 | mix0.5 | 2 | — | 2 | 2 | 4 |" in md  # exposure derived from steps and synthetic share
    more = ds.main(_argv(root, model, data, split, out, "--networks", "unet", "--regimes", "2", "--conditions",
                         "real", "mix0.5", "pretrain"))
    assert set(more["runs"]) == {"unet/n2/real/s0", "unet/n2/mix0.5/s0", "unet/n2/pretrain/s0"}
    assert json.loads(out.read_text())["settings"]["pretrain_share"] == 0.5  # recorded from now on
    with pytest.raises(ValueError, match="early_stopping"):
        ds.main(_argv(root, model, data, root / "split_val.json", out, "--regimes", "2", "--early-stopping"))


def test_committed_results_files_match_the_default_protocol(setup):
    ds, *_ = setup
    import downstream_report

    for path in sorted((BENCH / "results").glob("downstream_*.json")):
        results = json.loads(path.read_text())
        old = results["settings"]
        assert ds.settings_diff(old, {**old, **ds.protocol_settings(ds.parse_args([]))}) == {}, path.name
        diff = ds.settings_diff(old, {**old, **ds.protocol_settings(ds.parse_args(["--early-stopping"]))})
        # files written since pretrain_share was recorded also differ in it (early stopping has no pre-training share)
        recorded = {"pretrain_share"} & set(old)
        assert set(diff) == {"steps", "early_stopping", "max_steps", "val_every", "patience"} | recorded, path.name
        assert "| network | task | real cases |" in downstream_report.to_markdown(results)

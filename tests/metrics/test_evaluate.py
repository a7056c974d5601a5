"""`duodiff.metrics.evaluate` + `write_report`, and the `duodiff evaluate` command end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from duodiff.cli.main import main
from duodiff.io import spacing_affine, write_nifti
from duodiff.metrics import PairSet, evaluate, write_report
from duodiff.testing import phantom_pair, tiny_pipeline
from tests.conftest import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def _phantom_set(seeds, shape=(16, 16, 16)) -> PairSet:
    pairs = [phantom_pair(shape, num_classes=3, seed=s) for s in seeds]
    images = (torch.from_numpy(np.stack([p[0] for p in pairs]))[:, None] / 1000.0).clamp(0, 1)
    labels = torch.from_numpy(np.stack([p[1] for p in pairs])).long()[:, None]
    return PairSet(images, labels, (1.0, 1.0, 1.0), [f"p{s}" for s in seeds])


class ThresholdOracle(nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        ids = (images[:, 0] > 0.25).long() + (images[:, 0] > 0.575).long()
        return F.one_hot(ids, 3).movedim(-1, 1).float()


class PoolNet(nn.Module):
    """Deterministic slice features: average intensities over a 4x4 grid (16 numbers)."""

    def forward(self, slices: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(slices, 4).flatten(1)


def _write_folder(root: Path, seeds, shape=(18, 20, 17)) -> Path:
    for s in seeds:
        img, lab = phantom_pair(shape, num_classes=3, seed=s)
        write_nifti(root / "imagesTr" / f"case_{s:03d}_0000.nii.gz", img, spacing_affine((1, 1, 1)))
        write_nifti(root / "labelsTr" / f"case_{s:03d}.nii.gz", lab, spacing_affine((1, 1, 1)))
    return root


def test_evaluate_identical_vs_shifted():
    real = _phantom_set(range(6))
    same = evaluate(real, _phantom_set(range(6)), num_classes=3, label_names=["bg", "outer", "inner"],
                    segmenter=ThresholdOracle(), feature_network=PoolNet(), detector_steps=0, progress=False)
    m = same.metrics
    assert m["fid_2p5d"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert m["mmd"]["mmd2"] == pytest.approx(0.0, abs=1e-12)
    assert m["labels"]["classes"]["outer"]["wasserstein_mm3"] == 0.0
    assert m["pair_consistency"]["synthetic"]["mean_dice"] == pytest.approx(1.0)
    assert m["memorization"]["num_flagged"] == 6  # every "synthetic" image is a copy
    assert m["ms_ssim"]["synthetic"]["mean"] == pytest.approx(m["ms_ssim"]["real"]["mean"])
    assert same.real_volumes.shape == (6, 2)
    assert m["detectability"] is None and m["autoencoder_fidelity"] is None  # skipped / no model given
    json.dumps(m)  # serialisable

    darker = _phantom_set(range(10, 16))
    darker.images = darker.images * 0.6
    shifted = evaluate(real, darker, num_classes=3, segmenter=ThresholdOracle(), feature_network=PoolNet(),
                       detector_steps=0, progress=False)
    s = shifted.metrics
    assert s["fid_2p5d"]["mean"] > 10 * max(m["fid_2p5d"]["mean"], 1e-6)
    assert s["fid_2p5d"]["mean"] > s["fid_2p5d"]["real_split_half"]["mean"]
    assert s["mmd"]["mmd2"] > s["mmd"]["real_split_half"]
    assert s["pair_consistency"]["synthetic"]["mean_dice"] < 0.9  # the oracle's thresholds no longer fit
    assert s["memorization"]["num_flagged"] < 6


def test_evaluate_trains_segmenter_on_segmenter_data():
    real, train = _phantom_set(range(4)), _phantom_set(range(10, 13))
    ev = evaluate(real, _phantom_set(range(20, 23)), num_classes=3, segmenter_data=train, memorization_reference=train,
                  segmenter_steps=2, detector_steps=0, progress=False)
    seg = ev.metrics["setup"]["segmenter"]
    assert seg["trained_here"] and seg["train_set"] == "segmenter_data"
    assert seg["train_cases"] == train.names
    assert ev.metrics["pair_consistency"]["real_heldout"]["num_cases"] == 4  # all of real is held out
    assert ev.metrics["memorization"]["reference_set"] == "memorization_reference"
    assert "128 numbers" in ev.metrics["setup"]["feature_network"]
    with pytest.raises(ValueError, match="segmenter_data"):
        evaluate(real, real, num_classes=3, segmenter_data=_phantom_set(range(2), shape=(16, 16, 12)))


def test_evaluate_rejects_mismatched_sets():
    real = _phantom_set(range(3))
    with pytest.raises(ValueError, match="differ"):
        evaluate(real, _phantom_set(range(3), shape=(16, 16, 12)), num_classes=3, segmenter=ThresholdOracle(),
                 feature_network=PoolNet())
    with pytest.raises(ValueError, match="range"):
        evaluate(real, _phantom_set(range(3)), num_classes=2, segmenter=ThresholdOracle(), feature_network=PoolNet())
    with pytest.raises(TypeError, match="feature_network"):
        evaluate(real, _phantom_set(range(3)), num_classes=3, segmenter=ThresholdOracle())


def test_write_report_files(tmp_path):
    pytest.importorskip("matplotlib")
    real, synth = _phantom_set(range(4)), _phantom_set(range(4, 8))
    ev = evaluate(real, synth, num_classes=3, segmenter=ThresholdOracle(), feature_network=PoolNet(),
                  detector_steps=2, progress=False)
    written = write_report(ev, tmp_path, real=real, synthetic=synth, num_montage=2)
    for name in ("report.json", "report.md", "montage.png", "label_volumes.png", "memorization.png"):
        assert (tmp_path / name).is_file(), name
        assert (tmp_path / name).stat().st_size > 0
    assert "segmenter.safetensors" not in written  # the oracle was given, not trained
    md = (tmp_path / "report.md").read_text()
    assert "FID-2.5D mean" in md and "| class_1 |" in md and "![" in md
    assert "detectability ROC AUC (3D CNN, 4-fold CV)" in md
    assert "Autoencoder fidelity" in md and "Not measured: no model was given" in md
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["figures"]["label volume distributions"] == "label_volumes.png"


def test_cli_evaluate_end_to_end(tmp_path):
    """The real command in a subprocess: tiny model vs a folder of phantom pairs; segmenter trained here."""
    model = tmp_path / "model"
    tiny_pipeline().save_pretrained(model)
    real = _write_folder(tmp_path / "real", range(6))
    out = tmp_path / "out"
    proc = run_cli(["evaluate", "--model", str(model), "--real", str(real), "-n", "4", "--steps", "2",
                    "--segmenter-steps", "3", "--detector-steps", "2", "--detector-folds", "2",
                    "--out", str(out), "--cases", "case_000,case_001,case_002,case_003",
                    "--save-synthetic", "--no-progress"])
    assert proc.returncode == 0, proc.stderr
    for name in ("report.json", "report.md", "montage.png", "label_volumes.png", "memorization.png",
                 "segmenter.safetensors", "segmenter.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert report["setup"]["num_real"] == 4 and report["setup"]["num_synthetic"] == 4
    assert report["setup"]["synthetic_source"] == "generated"
    assert "percentile" in report["setup"]["preprocessing"]
    assert report["fid_2p5d"]["mean"] >= 0 and "real_split_half" in report["fid_2p5d"]
    assert set(report["pair_consistency"]) == {"synthetic", "real_heldout"}
    assert len(list((out / "synthetic" / "labelsTr").glob("*.nii.gz"))) == 4
    assert "FID-2.5D" in proc.stderr and "detectability ROC AUC" in proc.stderr and "PSNR" in proc.stderr
    assert report["detectability"]["num_folds"] == 2 and report["detectability"]["num_steps"] == 2
    assert report["autoencoder_fidelity"]["image"]["num_cases"] == 4
    assert set(report["autoencoder_fidelity"]["label"]["dice"]) == {"class_1", "class_2"}

    # reuse the saved segmenter on the saved synthetic folder, in-process, without a model
    out2 = tmp_path / "out2"
    code = main(["evaluate", "--synthetic", str(out / "synthetic"), "--real", str(real), "--segmenter", str(out),
                 "--detector-steps", "0", "--out", str(out2), "--no-progress"])
    assert code == 0
    again = json.loads((out2 / "report.json").read_text())
    assert again["setup"]["segmenter"]["trained_here"] is False
    assert again["setup"]["num_real"] == 6
    assert not (out2 / "segmenter.safetensors").exists()
    assert again["detectability"] is None and again["autoencoder_fidelity"] is None  # skipped; no model


def test_evaluate_reports_autoencoder_fidelity_and_detectability(tiny_pipe, tmp_path):
    """With the model's autoencoders given, the report gains their fidelity on the real cases; the detector's
    folds and seed are recorded; too few volumes for the folds asked for is said in the warnings."""
    real, synth = _phantom_set(range(5)), _phantom_set(range(10, 13))
    ev = evaluate(real, synth, num_classes=3, label_names=list(tiny_pipe.config.label_names),
                  segmenter=ThresholdOracle(), feature_network=PoolNet(),
                  image_autoencoder=tiny_pipe.image_autoencoder, label_autoencoder=tiny_pipe.label_autoencoder,
                  detector_steps=3, detector_folds=5, seed=7, progress=False)
    m = ev.metrics
    img, lab, det = m["autoencoder_fidelity"]["image"], m["autoencoder_fidelity"]["label"], m["detectability"]
    assert img["num_cases"] == 5 and [c["name"] for c in img["per_case"]] == real.names
    assert 0 <= img["l1"]["mean"] <= 1 and img["psnr_db"]["mean"] > 0
    assert set(lab["dice"]) == {"anterior", "posterior"}
    assert det["num_folds"] == 3 and len(det["fold_auc"]) == 3 and det["seed"] == 7 and det["num_steps"] == 3
    assert 0.0 <= det["auc"] <= 1.0
    assert any("3 folds instead of 5" in w for w in m["warnings"])
    assert {"autoencoder_s", "detectability_s"} <= set(m["timing_s"])
    json.dumps(m)
    md = write_report(ev, tmp_path)["report.md"].read_text()
    assert "| image | PSNR (dB, data range 1) |" in md and "| label | Dice anterior |" in md
    assert "3 stratified folds" in md and "seed 7" in md
    with pytest.raises(ValueError, match="detector_steps"):
        evaluate(real, synth, num_classes=3, segmenter=ThresholdOracle(), feature_network=PoolNet(),
                 detector_steps=-1)
    with pytest.raises(ValueError, match="detector_folds"):
        evaluate(real, synth, num_classes=3, segmenter=ThresholdOracle(), feature_network=PoolNet(),
                 detector_folds=1)


def test_cli_evaluate_bad_input(tmp_path, capsys):
    real = _write_folder(tmp_path / "real", range(2))
    assert main(["evaluate", "--synthetic", str(tmp_path / "missing"), "--real", str(real),
                 "--out", str(tmp_path / "o")]) == 2
    assert "missing' does not exist" in capsys.readouterr().err
    assert main(["evaluate", "--synthetic", str(real), "--real", str(real), "--out", str(tmp_path / "o")]) == 2
    assert "--normalize-synthetic" in capsys.readouterr().err
    assert main(["evaluate", "--synthetic", str(real), "--real", str(real), "--cases", "nope",
                 "--normalize-synthetic", "--out", str(tmp_path / "o")]) == 2
    assert "nope" in capsys.readouterr().err

"""`duodiff.metrics.evaluate` + `write_report`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from duodiff.metrics import PairSet, evaluate, write_report
from duodiff.testing import phantom_pair


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

"""Pair consistency with an oracle segmenter, and the memorisation check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from duodiff.metrics import dice_per_class, nearest_real, normalized_cross_correlation, pair_consistency
from duodiff.testing import phantom_pair


def _phantoms(n: int, shape=(16, 16, 16)) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [phantom_pair(shape, num_classes=3, seed=s) for s in range(n)]
    images = torch.from_numpy(np.stack([p[0] for p in pairs]))[:, None] / 1000.0
    labels = torch.from_numpy(np.stack([p[1] for p in pairs])).long()[:, None]
    return images.clamp(0, 1), labels


class ThresholdOracle(nn.Module):
    """Phantom intensities are 50 / 450 / 700 (+- 20 noise) per class: thresholds recover the label exactly."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        ids = (images[:, 0] > 0.25).long() + (images[:, 0] > 0.575).long()
        return F.one_hot(ids, 3).movedim(-1, 1).float()


def test_pair_consistency_oracle_is_one():
    images, labels = _phantoms(3)
    out = pair_consistency(images, labels, ThresholdOracle(), num_classes=3, label_names=["bg", "in", "core"],
                           batch_size=2)
    assert out["dice"] == {"in": pytest.approx(1.0), "core": pytest.approx(1.0)}
    assert out["mean_dice"] == pytest.approx(1.0)
    assert out["per_sample"] == [pytest.approx(1.0)] * 3


def test_pair_consistency_detects_mismatched_pairs():
    images, labels = _phantoms(3)
    swapped = torch.roll(labels, shifts=4, dims=2)  # labels no longer match the images
    out = pair_consistency(images, swapped, ThresholdOracle(), num_classes=3)
    assert out["mean_dice"] < 0.9


def test_pair_consistency_rejects_wrong_output():
    images, labels = _phantoms(2)
    with pytest.raises(ValueError, match="class scores"):
        pair_consistency(images, labels, lambda x: x, num_classes=3)


def test_dice_absent_class_conventions():
    target = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    assert dice_per_class(target, target, 2).tolist() == [[1.0]]  # absent in both: 1
    pred = target.clone()
    pred[0, 0, 0, 0, 0] = 1
    assert dice_per_class(pred, target, 2).tolist() == [[0.0]]  # predicted but absent: 0


def test_ncc_properties():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 1, 8, 8, 8, generator=g)
    ncc = normalized_cross_correlation(a, torch.cat([a[:1] * 3 + 1, torch.zeros(1, 1, 8, 8, 8)]))
    assert ncc.shape == (3, 2)
    assert float(ncc[0, 0]) == pytest.approx(1.0)  # invariant to affine intensity changes
    assert float(ncc[1, 0]) < 0.3
    assert torch.all(ncc[:, 1] == 0)  # constant volume


def test_memorization_flags_exact_copy():
    images, _ = _phantoms(5)
    real = images[:4]
    g = torch.Generator().manual_seed(1)
    synthetic = torch.stack([real[2], torch.rand(1, 16, 16, 16, generator=g)])
    out = nearest_real(synthetic, real, real_names=[f"r{i}" for i in range(4)], synthetic_names=["copy", "noise"],
                       threshold=0.95)
    assert out["num_flagged"] == 1
    assert out["flagged"][0]["synthetic"] == "copy" and out["flagged"][0]["real"] == "r2"
    assert out["flagged"][0]["ncc"] == pytest.approx(1.0)
    assert out["nearest"][0]["ssim"] == pytest.approx(1.0, abs=1e-5)
    assert out["nearest"][1]["ncc"] < 0.5
    ref = nearest_real(real, real, exclude_self=True, with_ssim=False)
    assert ref["ncc"]["max"] < 1.0  # distinct phantoms are not copies of each other
    with pytest.raises(ValueError, match="threshold"):
        nearest_real(synthetic, real, threshold=2.0)

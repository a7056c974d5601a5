"""Pair consistency with an oracle segmenter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from duodiff.metrics import pair_consistency
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

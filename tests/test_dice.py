"""Dice conventions for absent classes."""

from __future__ import annotations

import torch

from duodiff.metrics import dice_per_class


def test_dice_absent_class_conventions():
    target = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    assert dice_per_class(target, target, 2).tolist() == [[1.0]]  # absent in both: 1
    pred = target.clone()
    pred[0, 0, 0, 0, 0] = 1
    assert dice_per_class(pred, target, 2).tolist() == [[0.0]]  # predicted but absent: 0

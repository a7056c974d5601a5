"""Pair consistency: does a synthetic image show the anatomy of the label it was generated from?

A segmenter trained on real pairs segments each synthetic image; the Dice score between its
prediction and the generating label measures image-label agreement. Read it next to the same
segmenter's Dice on held-out *real* pairs: that is the ceiling the synthetic pairs can reach.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..dice import dice_per_class

__all__ = ["dice_per_class", "pair_consistency"]


@torch.no_grad()
def pair_consistency(
    images: torch.Tensor,
    labels: torch.Tensor,
    segmenter: Callable[[torch.Tensor], torch.Tensor],
    *,
    num_classes: int,
    label_names: Sequence[str] | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Dice between ``segmenter(images)`` and ``labels``.

    Args:
        images: float ``(N, C, H, W, D)`` in [0, 1].
        labels: int ``(N, 1, H, W, D)`` (the labels the images were generated from).
        segmenter: maps ``(B, C, H, W, D)`` to class scores ``(B, num_classes, H, W, D)`` (logits or
            probabilities; the argmax is used).
        num_classes: classes including background.
        label_names: class names, background first.
        batch_size: volumes per segmenter call.

    Returns:
        ``{"dice": {name: mean over samples}, "mean_dice": mean over classes, "per_sample": [mean per sample]}``.
    """
    names = list(label_names) if label_names else [f"class_{k}" for k in range(num_classes)]
    preds = []
    for i in range(0, images.shape[0], batch_size):
        scores = segmenter(images[i:i + batch_size])
        if scores.ndim != 5 or scores.shape[1] != num_classes or scores.shape[2:] != images.shape[2:]:
            raise ValueError(f"The segmenter must return (B, {num_classes}, H, W, D) class scores, got "
                             f"{tuple(scores.shape)} for input {tuple(images[i:i + batch_size].shape)}.")
        preds.append(scores.argmax(1, keepdim=True).cpu())
    dice = dice_per_class(torch.cat(preds), labels.cpu(), num_classes)
    per_class = dice.mean(0)
    return {"dice": {names[k]: float(per_class[k - 1]) for k in range(1, num_classes)},
            "mean_dice": float(per_class.mean()), "per_sample": [round(float(v), 6) for v in dice.mean(1)]}

"""The one Dice of duodiff: per-class overlap of two label maps.

Evaluation (:func:`duodiff.metrics.pair_consistency`, :func:`duodiff.metrics.label_reconstruction`), the sampling
QC (:func:`duodiff.control.pair_dice`) and the training report all score with :func:`dice_per_class`, so a
threshold means the same everywhere. It lives outside :mod:`duodiff.metrics` so that sampling can use it without
importing the evaluation stack; ``duodiff.metrics`` re-exports it.

Example:
    >>> import torch
    >>> from duodiff.dice import dice_per_class
    >>> target = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    >>> target[..., :2] = 1
    >>> dice_per_class(target, target, 3).tolist()  # class 1 matches, class 2 absent from both
    [[1.0, 1.0]]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dice_per_class"]


def dice_per_class(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Dice of each foreground class (``monai.metrics.DiceMetric``).

    A class absent from both prediction and target scores 1; absent from the target only, 0.

    Args:
        pred: int ``(N, 1, H, W, D)`` predicted ids.
        target: int ``(N, 1, H, W, D)`` reference ids.
        num_classes: classes including background.

    Returns:
        float32 ``(N, num_classes - 1)``.
    """
    from monai.metrics import DiceMetric

    if pred.shape != target.shape or pred.ndim != 5 or pred.shape[1] != 1:
        raise ValueError(f"pred and target must both be (N, 1, H, W, D), got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}.")

    def one_hot(x: torch.Tensor) -> torch.Tensor:
        return F.one_hot(x[:, 0].long(), num_classes).movedim(-1, 1).float()

    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
    return torch.as_tensor(metric(one_hot(pred), one_hot(target))).float()

"""Acceptance tests for generated pairs: requested class volumes (rejection sampling) and pair-consistency QC.

Both return a boolean "accepted" mask per sample; :meth:`duodiff.DuoDiffusion.sample` regenerates rejected
samples with new seeds (derived deterministically from the original seed) up to ``max_retries`` times and
reports what happened in ``DuoSample.report``. Samples that still fail are kept and listed, never dropped.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["retry_seed", "volumes_within_tolerance", "pair_dice", "qc_accepts"]


def retry_seed(seed: int, attempt: int) -> int:
    """The seed of retry ``attempt`` (1, 2, ...) of the sample first made with ``seed``."""
    digest = hashlib.sha256(f"duodiff:retry:{int(seed)}:{int(attempt)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


def volumes_within_tolerance(
    labels: torch.Tensor, requested_log_voxels: torch.Tensor, mask: torch.Tensor, tolerance: float,
    num_classes: int,
) -> torch.Tensor:
    """Whether every requested class volume is met within a relative ``tolerance``.

    Args:
        labels: int ``(N, 1, H, W, D)``.
        requested_log_voxels: ``(N, K-1)`` ``log1p(voxels)`` requests (the "volume" attribute columns).
        mask: ``(N, K-1)`` 1 where a volume was requested.
        tolerance: e.g. ``0.1`` accepts volumes within +-10 % of the request.

    Returns:
        bool ``(N,)``.
    """
    lab = labels[:, 0].cpu()
    ok = torch.ones(lab.shape[0], dtype=torch.bool)
    for k in range(1, num_classes):
        got = (lab == k).flatten(1).sum(1).double()
        want = torch.expm1(requested_log_voxels[:, k - 1].double())
        rel = (got - want).abs() / want.clamp_min(1.0)
        ok &= (mask[:, k - 1] == 0) | (rel <= tolerance)
    return ok


def pair_dice(segmenter: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean foreground Dice between ``segmenter(images)`` and ``labels`` per sample.

    Args:
        segmenter: maps float ``(N, C, H, W, D)`` images to ``(N, K, H, W, D)`` logits/probabilities.
        images: float ``(N, C, H, W, D)`` in [0, 1].
        labels: int ``(N, 1, H, W, D)``.

    Returns:
        float ``(N,)`` in [0, 1]; a class absent from both prediction and label counts as Dice 1.
    """
    param = next(segmenter.parameters(), None)
    device = param.device if param is not None else images.device
    with torch.inference_mode():
        pred = segmenter(images.to(device).float()).argmax(1).cpu()
    lab = labels[:, 0].cpu().long()
    p = F.one_hot(pred, num_classes).movedim(-1, 1)[:, 1:].flatten(2).float()
    g = F.one_hot(lab, num_classes).movedim(-1, 1)[:, 1:].flatten(2).float()
    inter = (p * g).sum(2)
    denom = p.sum(2) + g.sum(2)
    dice = torch.where(denom > 0, 2 * inter / denom.clamp_min(1), torch.ones_like(denom))
    return dice.mean(1)


def qc_accepts(segmenter: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
               threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(accepted (N,) bool, dice (N,))``: a pair passes if its :func:`pair_dice` is ``>= threshold``."""
    if not 0 <= threshold <= 1 or (isinstance(threshold, float) and math.isnan(threshold)):
        raise ValueError(f"qc_threshold must be a Dice value in [0, 1], got {threshold}.")
    dice = pair_dice(segmenter, images, labels, num_classes)
    return dice >= threshold, dice


def summarise(n: int, attempts: int, volume_rejections: int, qc_rejections: int,
              failed_seeds: Sequence[int], qc_dice: Sequence[float] | None) -> dict:
    """The ``DuoSample.report`` entry of a constrained sampling run."""
    out = {
        "requested": n,
        "attempts": attempts,
        "acceptance_rate": (n - len(failed_seeds)) / attempts if attempts else 1.0,
        "volume_rejections": volume_rejections,
        "qc_rejections": qc_rejections,
        "failed_seeds": list(failed_seeds),
    }
    if qc_dice is not None:
        out["qc_dice"] = [round(float(d), 4) for d in qc_dice]
    return out

"""Acceptance tests for generated pairs: requested class volumes (rejection sampling) and pair-consistency QC.

Both return a boolean "accepted" mask per sample; :class:`RejectionSampler` (the loop of
:meth:`duodiff.DuoDiffusion.sample`) regenerates rejected samples with new seeds (derived deterministically from
the original seed) up to ``max_retries`` times and reports what happened in ``DuoSample.report``. Samples that
still fail are kept and listed, never dropped.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from .dice import dice_per_class
from .seeding import hash_seed

if TYPE_CHECKING:  # pragma: no cover
    from .sampling_options import SamplingPlan

__all__ = ["retry_seed", "volumes_within_tolerance", "pair_dice", "qc_accepts", "RejectionSampler"]

#: Added to the attempt number in :func:`retry_seed` for QC retries, so they never reuse a volume retry's seed.
QC_RETRY_SALT = 100


def retry_seed(seed: int, attempt: int) -> int:
    """The seed of retry ``attempt`` (1, 2, ...) of the sample first made with ``seed``."""
    return hash_seed("duodiff", "retry", int(seed), int(attempt), bits=62)


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
        float ``(N,)`` in [0, 1]: the mean over foreground classes of
        :func:`duodiff.dice.dice_per_class` (a class absent from both prediction and label counts as Dice 1).
    """
    param = next(segmenter.parameters(), None)
    device = param.device if param is not None else images.device
    with torch.inference_mode():
        pred = segmenter(images.to(device).float()).argmax(1, keepdim=True).cpu()
    return dice_per_class(pred, labels.cpu().long(), num_classes).mean(1)


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


class RejectionSampler:
    """Generates samples by index, regenerating those that a check rejects with retry seeds.

    It exists to keep the state that the retries share in one place: the per-sample seeds (a rejected sample's
    seed is replaced by its :func:`retry_seed`, so ``seeds[i]`` always reproduces sample ``i``) and the counts of
    :meth:`report`. Sample ``i`` depends only on ``seeds[i]``, so batching does not change the result.

    Args:
        plan: the call's options resolved against the model; uses ``options.seeds``, ``volume_tolerance``, ``qc``,
            ``qc_threshold``, ``max_retries`` and the plan's ``requested_volumes`` / ``volume_mask``.
        make_labels: ``(seeds, indices) -> labels``: int64 ``(n, 1, H, W, D)`` label maps of the samples
            ``indices`` made with ``seeds`` (one per index).
        make_images: ``(labels, seeds) -> images``: float32 ``(n, C, H, W, D)`` images in [0, 1] for the labels.
        num_classes: ``K``, background included.
    """

    def __init__(
        self,
        plan: SamplingPlan,
        make_labels: Callable[[list[int], list[int]], torch.Tensor],
        make_images: Callable[[torch.Tensor, list[int]], torch.Tensor],
        num_classes: int,
    ) -> None:
        self.plan, self.options = plan, plan.options
        self.make_labels, self.make_images, self.num_classes = make_labels, make_images, num_classes
        self.seeds = list(self.options.seeds)
        self.attempts = 0
        self.rejections = {"volume": 0, "qc": 0}
        # sample index -> seed of its kept output that a check still rejects; a regenerated sample starts clean,
        # so a sample failing both checks (or failing, then being regenerated by the other) is listed once
        self._failed: dict[int, int] = {}
        self.qc_dice: list[float | None] = [None] * len(self.seeds)

    def pairs(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images, labels)`` of the samples ``start:stop``, each accepted or out of retries."""
        idx = list(range(start, stop))
        # 1. labels, regenerated while their measured volumes miss the request (rejection sampling)
        lab = self.labels(idx)
        # 2. images for the labels
        img = self.make_images(lab, [self.seeds[i] for i in idx])
        # 3. pair-consistency QC: regenerate pairs whose image does not show its label
        if self.options.qc is not None:
            img, lab = self._retry(idx, (img, lab), self._qc_accepts, self._new_pairs, QC_RETRY_SALT, "qc")
        return img, lab

    def labels(self, idx: list[int]) -> torch.Tensor:
        """int64 ``(len(idx), 1, H, W, D)`` labels of the samples ``idx``, volume-checked if requested."""
        lab = self._new_labels(idx)
        if self.options.volume_tolerance is not None:
            (lab,) = self._retry(idx, (lab,), self._volumes_accepted, lambda sub: (self._new_labels(sub),), 0,
                                 "volume")
        return lab

    def report(self) -> dict:
        """The ``DuoSample.report`` entry of this run (see :func:`summarise`)."""
        return summarise(len(self.seeds), self.attempts, self.rejections["volume"], self.rejections["qc"],
                         self.failed_seeds, self.qc_dice if self.options.qc is not None else None)

    @property
    def failed_seeds(self) -> list[int]:
        """Seeds of the kept samples that a check rejected after the last retry, in sample order, each once."""
        return [self._failed[i] for i in sorted(self._failed)]

    def _new_labels(self, idx: list[int]) -> torch.Tensor:
        for i in idx:  # a new sample: earlier rejections were of the output it replaces
            self._failed.pop(i, None)
        self.attempts += len(idx)
        return self.make_labels([self.seeds[i] for i in idx], idx)

    def _new_pairs(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        lab = self.labels(idx)
        return self.make_images(lab, [self.seeds[i] for i in idx]), lab

    def _volumes_accepted(self, idx: list[int], out: tuple[torch.Tensor, ...]) -> torch.Tensor:
        tolerance = self.options.volume_tolerance
        assert tolerance is not None  # only called with volume_tolerance
        return volumes_within_tolerance(out[0], self.plan.requested_volumes[idx], self.plan.volume_mask[idx],
                                        tolerance, self.num_classes)

    def _qc_accepts(self, idx: list[int], out: tuple[torch.Tensor, ...]) -> torch.Tensor:
        img, lab = out
        assert self.options.qc is not None  # only called with qc
        ok, dice = qc_accepts(self.options.qc, img, lab, self.num_classes, self.options.qc_threshold)
        for j, i in enumerate(idx):
            self.qc_dice[i] = float(dice[j])
        return ok

    def _retry(
        self,
        idx: list[int],
        out: tuple[torch.Tensor, ...],
        accepted: Callable[[list[int], tuple[torch.Tensor, ...]], torch.Tensor],
        regenerate: Callable[[list[int]], tuple[torch.Tensor, ...]],
        salt: int,
        kind: str,
    ) -> tuple[torch.Tensor, ...]:
        """Regenerate the rows of ``out`` (samples ``idx``) that ``accepted`` rejects, up to ``max_retries`` times;
        samples rejected after the last retry are kept and their seeds listed in ``failed_seeds``."""
        for attempt in itertools.count(1):
            ok = accepted(idx, out)
            bad = [j for j in range(len(idx)) if not ok[j]]
            self.rejections[kind] += len(bad)
            if not bad or attempt > self.options.max_retries:
                self._failed.update({idx[j]: self.seeds[idx[j]] for j in bad})
                break
            for j in bad:
                self.seeds[idx[j]] = retry_seed(self.seeds[idx[j]], salt + attempt)
            new = regenerate([idx[j] for j in bad])
            out = tuple(o.clone() for o in out)
            for o, n in zip(out, new):
                o[bad] = n
        return out

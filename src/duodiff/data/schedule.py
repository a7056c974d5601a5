"""How many synthetic samples a batch holds: the one definition shared by both mixers.

:class:`~duodiff.MixedBatchSampler` (fixed batch size, real samples fill the rest) and
:func:`~duodiff.mix_loaders` (every real batch kept, synthetic samples appended) answer the same two
questions the same way:

1. **Progress** of a batch, in ``[0, 1]`` (:func:`schedule_progress`): with ``schedule_unit="epoch"``
   (the default of both) ``epoch / (num_epochs - 1)``; with ``"step"`` the share of the planned real data
   consumed before the batch.
2. **Count**: the schedule turns progress into a fraction ``f`` (:class:`FractionSchedule`), and a batch of
   ``N`` samples holds ``round_half_up(f * N)`` synthetic ones (:func:`synthetic_count`). ``mix_loaders``
   knows the real count ``r`` instead of ``N`` and appends the ``n`` of :func:`synthetic_count_for_real`,
   which satisfies ``n == synthetic_count(f, r + n)``: the merged batch obeys the same rule.

So one ``synthetic_fraction`` is the synthetic share of every batch in both systems.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

__all__ = [
    "SCHEDULES",
    "SCHEDULE_UNITS",
    "DEFAULT_SCHEDULE_UNIT",
    "FractionSchedule",
    "round_half_up",
    "schedule_progress",
    "synthetic_count",
    "synthetic_count_for_real",
    "check_schedule_unit",
]

SCHEDULES = ("constant", "linear", "cosine")
SCHEDULE_UNITS = ("epoch", "step")
#: The default ``schedule_unit`` of both mixers: one fraction per epoch, so the first epoch uses
#: ``synthetic_fraction`` and the last ``final_synthetic_fraction`` whatever the batch sizes.
DEFAULT_SCHEDULE_UNIT = "epoch"


def round_half_up(x: float) -> int:
    """``floor(x + 0.5)``: 0.5 -> 1, 1.5 -> 2, 1.49 -> 1 (with a 1e-9 tolerance for float error)."""
    return int(math.floor(x + 0.5 + 1e-9))


def check_fraction(name: str, value: Any) -> float:
    """``value`` as a float in ``[0, 1]``, else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}.")
    return float(value)


def check_int(name: str, value: Any, *, allow_zero: bool = False) -> int:
    """``value`` if it is an int >= 1 (>= 0 with ``allow_zero``), else ``ValueError`` naming ``name``."""
    lo = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}.")
    return value


class FractionSchedule:
    """The synthetic fraction as a function of training progress ``p`` in ``[0, 1]``.

    * ``"constant"``: ``synthetic_fraction``.
    * ``"linear"``: from ``synthetic_fraction`` at ``p=0`` to ``final_synthetic_fraction`` at ``p=1``.
    * ``"cosine"``: the same endpoints along half a cosine (slow start and end).
    * a callable ``f(p) -> fraction``: then ``synthetic_fraction``/``final_synthetic_fraction`` are not used.

    Example:
        >>> FractionSchedule("linear", synthetic_fraction=0.5, final_synthetic_fraction=0.1)(0.5)
        0.3
    """

    def __init__(
        self,
        schedule: str | Callable[[float], float] = "constant",
        *,
        synthetic_fraction: float | None = None,
        final_synthetic_fraction: float | None = None,
    ) -> None:
        if callable(schedule):
            if synthetic_fraction is not None or final_synthetic_fraction is not None:
                raise ValueError(
                    "With a callable schedule the fraction comes from schedule(progress); do not also pass "
                    "synthetic_fraction or final_synthetic_fraction."
                )
            self.start = self.end = None
        elif schedule in SCHEDULES:
            if synthetic_fraction is None:
                raise ValueError(f"schedule={schedule!r} needs synthetic_fraction (the fraction at the start).")
            self.start = check_fraction("synthetic_fraction", synthetic_fraction)
            if schedule == "constant":
                if final_synthetic_fraction is not None and final_synthetic_fraction != synthetic_fraction:
                    raise ValueError(
                        "final_synthetic_fraction only applies to schedule='linear' or 'cosine'; the constant schedule "
                        f"keeps synthetic_fraction={synthetic_fraction}."
                    )
                self.end = self.start
            else:
                if final_synthetic_fraction is None:
                    raise ValueError(f"schedule={schedule!r} needs final_synthetic_fraction (the fraction at the end).")
                self.end = check_fraction("final_synthetic_fraction", final_synthetic_fraction)
        else:
            raise ValueError(
                f"schedule must be one of {list(SCHEDULES)} or a callable progress -> fraction, got {schedule!r}."
            )
        self.schedule = schedule

    @property
    def is_constant(self) -> bool:
        """Whether the fraction does not depend on progress."""
        return self.schedule == "constant"

    def __call__(self, progress: float) -> float:
        p = min(max(float(progress), 0.0), 1.0)
        if callable(self.schedule):
            value = self.schedule(p)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"schedule({p:.4g}) returned {value!r}; a schedule must return a fraction in [0, 1].")
            return float(value)
        start, end = self.start, self.end
        if self.schedule == "constant":
            return start  # type: ignore[return-value]
        if self.schedule == "linear":
            return start + (end - start) * p  # type: ignore[operator]
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * p))  # type: ignore[operator]

    def __repr__(self) -> str:
        if callable(self.schedule):
            return f"FractionSchedule({getattr(self.schedule, '__name__', self.schedule)!r})"
        return f"FractionSchedule({self.schedule!r}, start={self.start}, end={self.end})"


def check_schedule_unit(schedule: FractionSchedule, num_epochs: int | None, unit: str) -> None:
    """Raise ``ValueError`` for an unknown ``unit``, or a changing schedule without a positive ``num_epochs``."""
    if unit not in SCHEDULE_UNITS:
        raise ValueError(f"schedule_unit must be one of {list(SCHEDULE_UNITS)}, got {unit!r}.")
    if not schedule.is_constant:
        if num_epochs is None:
            raise ValueError(
                f"A changing schedule ({schedule!r}) needs num_epochs, the planned length of training, to compute "
                "progress."
            )
        check_int("num_epochs", num_epochs)


def schedule_progress(epoch: int, *, num_epochs: int | None, unit: str, done: int = 0, per_epoch: int = 1) -> float:
    """Training progress in ``[0, 1]`` of a batch of ``epoch``.

    Args:
        epoch: the current epoch (0-based).
        num_epochs: planned epochs; ``None`` gives 0 (no schedule to follow).
        unit: ``"epoch"``: ``epoch / (num_epochs - 1)``, one value per epoch (the first epoch at 0, the last
            at 1). ``"step"``: ``(epoch * per_epoch + done) / (num_epochs * per_epoch - 1)``, a value per batch.
        done: real data of this epoch consumed before the batch (``"step"`` only).
        per_epoch: real data per epoch (``"step"`` only). :class:`~duodiff.MixedBatchSampler` counts real
            samples of its rank (its number of batches depends on the schedule); :func:`~duodiff.mix_loaders`
            counts real batches (``len(real_loader)``). Both are the same share of training when real batches
            are full.
    """
    if num_epochs is None:
        return 0.0
    if unit == "epoch":
        return min(epoch / max(num_epochs - 1, 1), 1.0)
    return min((epoch * per_epoch + done) / max(num_epochs * per_epoch - 1, 1), 1.0)


def synthetic_count(fraction: float, batch_size: int) -> int:
    """Synthetic samples in a batch of ``batch_size`` samples: ``round_half_up(fraction * batch_size)``.

    Example:
        >>> synthetic_count(0.25, 4), synthetic_count(0.35, 10), synthetic_count(0.1, 4)
        (1, 4, 0)
    """
    return round_half_up(fraction * batch_size)


def synthetic_count_for_real(fraction: float, num_real: int) -> int:
    """Synthetic samples to append to ``num_real`` real ones so that ``fraction`` is their share of the batch.

    ``n = round_half_up(fraction * num_real / (1 - fraction))``, the whole count nearest the exact share. It
    always satisfies ``n == synthetic_count(fraction, num_real + n)``: the merged batch holds exactly the
    synthetic count the rule gives for its size (``tests/data/test_schedule.py`` pins this).

    Example:
        >>> n = synthetic_count_for_real(0.25, 3)
        >>> n, synthetic_count(0.25, 3 + n)
        (1, 1)

    Raises:
        ValueError: ``fraction >= 1`` (no real sample could be kept).
    """
    if fraction >= 1.0:
        raise ValueError(
            f"synthetic fraction {fraction:.4g} is not possible with mix_loaders, which keeps every real sample; "
            "use a fraction < 1."
        )
    return round_half_up(fraction * num_real / (1.0 - fraction))

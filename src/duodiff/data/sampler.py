"""`MixedBatchSampler`: batches of indices into ``ConcatDataset([real, synthetic])`` with a set synthetic count."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import ConcatDataset, Sampler

from ..distributed import group_rank
from ..keys import IS_SYNTHETIC, SEED
from ..seeding import hash_seed
from .schedule import (
    DEFAULT_SCHEDULE_UNIT,
    FractionSchedule,
    check_int,
    check_schedule_unit,
    schedule_progress,
    synthetic_count,
)

__all__ = ["MixedBatchSampler", "mark_real", "derive_seed"]


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed hashed from ``parts`` (the same parts give the same seed in every process)."""
    return hash_seed("duodiff-mix", *parts)


def mark_real(item: Mapping[str, Any]) -> dict[str, Any]:
    """Add ``"is_synthetic": False`` and ``"seed": -1`` to a real sample dict (a copy).

    Synthetic items carry these keys; put this last in the real dataset's transform so real and
    synthetic dicts have the same keys and collate into one batch (``ConcatDataset`` +
    :class:`MixedBatchSampler`).
    """
    if not isinstance(item, Mapping):
        raise TypeError(f"mark_real expects a dict sample, got {type(item).__name__}.")
    return {**item, IS_SYNTHETIC: False, SEED: -1}


class MixedBatchSampler(Sampler[list[int]]):
    """Batches of indices into ``ConcatDataset([real, synthetic])`` with a set number of synthetic samples.

    Every batch of an epoch holds ``n_syn = min(synthetic_count(f, batch_size), batch_size -
    min_real_per_batch)`` synthetic samples (``round_half_up(f * batch_size)``, the rule of
    :mod:`duodiff.data.schedule` that :func:`~duodiff.mix_loaders` follows too), where ``f`` is the scheduled
    fraction; real samples fill the rest (reals first, then synthetic). An epoch is one pass over this rank's
    real samples, so the last batch may hold fewer real samples (unless ``drop_last``). Synthetic indices are
    drawn without replacement from a seeded permutation stream that continues across epochs (the synthetic
    set is used up before any index repeats).

    DDP: each rank (``rank`` of ``num_replicas``) gets a disjoint share of the real samples (padded by
    repeating a few, like ``DistributedSampler``, unless ``drop_last``) and of the synthetic stream; all
    ranks yield the same number of batches. Call :meth:`set_epoch` at the start of every epoch.

    Example:
        >>> from torch.utils.data import ConcatDataset, DataLoader
        >>> data = ConcatDataset([list(range(12)), list(range(100, 140))])
        >>> sampler = MixedBatchSampler(data, batch_size=4, synthetic_fraction=0.25, seed=0)
        >>> [sum(i >= 12 for i in batch) for batch in sampler]
        [1, 1, 1, 1]

    Args:
        dataset: ``ConcatDataset([real, synthetic])`` of two map-style datasets, real first.
        batch_size: samples per batch.
        synthetic_fraction: fraction of synthetic samples per batch (start value for ramps).
        schedule: ``"constant"``, ``"linear"``, ``"cosine"`` or a callable ``progress -> fraction``.
        final_synthetic_fraction: end value of ``"linear"``/``"cosine"``.
        num_epochs: planned epochs; needed by changing schedules.
        schedule_unit: ``"epoch"`` (default, as in :func:`~duodiff.mix_loaders`): one fraction per epoch,
            progress ``epoch / (num_epochs - 1)``; ``"step"``: per batch, progress = share of this rank's planned
            real samples seen before the batch (:func:`~duodiff.data.schedule.schedule_progress`).
        min_real_per_batch: keep at least this many real samples in every batch.
        shuffle: shuffle the real samples every epoch.
        drop_last: drop a last batch that is not full (and, with several replicas, the real samples
            that do not divide evenly between them).
        seed: seed of all shuffling; the same seed gives the same batches.
        rank: this process's rank (default: ``torch.distributed`` if initialised, else 0).
        num_replicas: number of DDP processes (default: ``torch.distributed`` world size, else 1).
    """

    def __init__(
        self,
        dataset: ConcatDataset,
        batch_size: int,
        *,
        synthetic_fraction: float | None = None,
        schedule: str | Callable[[float], float] = "constant",
        final_synthetic_fraction: float | None = None,
        num_epochs: int | None = None,
        schedule_unit: str = DEFAULT_SCHEDULE_UNIT,
        min_real_per_batch: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        rank: int | None = None,
        num_replicas: int | None = None,
    ) -> None:
        if not isinstance(dataset, ConcatDataset) or len(dataset.datasets) != 2:
            got = (f"a ConcatDataset of {len(dataset.datasets)} datasets" if isinstance(dataset, ConcatDataset)
                   else type(dataset).__name__)
            raise TypeError(
                f"dataset must be ConcatDataset([real, synthetic]) (two map-style datasets, real first), got {got}."
            )
        self.num_real, self.num_synthetic = (len(d) for d in dataset.datasets)  # type: ignore[arg-type]
        if self.num_real < 1 or self.num_synthetic < 1:
            raise ValueError(
                f"Both datasets must be non-empty, got {self.num_real} real and {self.num_synthetic} synthetic samples."
            )
        self.batch_size = check_int("batch_size", batch_size)
        self.schedule = FractionSchedule(schedule, synthetic_fraction=synthetic_fraction,
                                         final_synthetic_fraction=final_synthetic_fraction)
        check_schedule_unit(self.schedule, num_epochs, schedule_unit)
        self.num_epochs, self.schedule_unit = num_epochs, schedule_unit
        self.min_real_per_batch = check_int("min_real_per_batch", min_real_per_batch, allow_zero=True)
        if min_real_per_batch > batch_size:
            raise ValueError(f"min_real_per_batch ({min_real_per_batch}) cannot exceed batch_size ({batch_size}).")
        self.shuffle, self.drop_last, self.seed = bool(shuffle), bool(drop_last), int(seed)
        group = group_rank()
        if (rank is None) != (num_replicas is None):
            if group is None:
                raise ValueError("Pass rank and num_replicas together (torch.distributed is not initialised).")
            rank = group[0] if rank is None else rank
            num_replicas = group[1] if num_replicas is None else num_replicas
        if rank is None:
            rank, num_replicas = group or (0, 1)
        self.num_replicas = check_int("num_replicas", num_replicas)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.num_replicas:
            raise ValueError(f"rank must be an int in [0, {self.num_replicas}), got {rank!r}.")
        self.rank = rank
        if drop_last:
            self.real_per_rank = self.num_real // self.num_replicas
            if self.real_per_rank == 0:
                raise ValueError(
                    f"drop_last with {self.num_real} real samples and {self.num_replicas} replicas leaves none per "
                    "replica; use drop_last=False or fewer replicas."
                )
        else:
            self.real_per_rank = math.ceil(self.num_real / self.num_replicas)
        self.epoch = 0
        self._plans: dict[int, list[tuple[int, int]]] = {}
        self._synthetic_offsets: dict[int, int] = {0: 0}
        self._permutations: dict[int, list[int]] = {}
        # validate the schedule now rather than mid-training: its first and last epochs hold the extreme
        # fractions of the built-in (monotone) schedules
        last = self.num_epochs - 1 if self.num_epochs and not self.schedule.is_constant else 0
        for e in sorted({0, last}):
            self.batch_plan(e)

    def __repr__(self) -> str:
        return (
            f"MixedBatchSampler(num_real={self.num_real}, num_synthetic={self.num_synthetic}, "
            f"batch_size={self.batch_size}, schedule={self.schedule!r}, unit={self.schedule_unit!r}, "
            f"min_real_per_batch={self.min_real_per_batch}, rank={self.rank}/{self.num_replicas}, epoch={self.epoch})"
        )

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: it seeds the shuffling and sets the schedule's progress."""
        self.epoch = check_int("epoch", epoch, allow_zero=True)

    # ------------------------------------------------------------------ plan
    def progress(self, epoch: int, real_seen: int = 0) -> float:
        """Training progress in [0, 1] for a batch of ``epoch`` after ``real_seen`` real samples of this rank."""
        if self.schedule.is_constant:
            return 0.0
        return schedule_progress(epoch, num_epochs=self.num_epochs, unit=self.schedule_unit, done=real_seen,
                                 per_epoch=self.real_per_rank)

    def synthetic_count(self, fraction: float, progress: float = 0.0) -> int:
        """Synthetic samples in a full batch for ``fraction``: the shared rule, capped by ``min_real_per_batch``."""
        n_syn = min(synthetic_count(fraction, self.batch_size), self.batch_size - self.min_real_per_batch)
        if n_syn >= self.batch_size:
            raise ValueError(
                f"synthetic fraction {fraction:.4g} (progress {progress:.3g}) leaves no real sample in a batch of "
                f"{self.batch_size}; lower the fraction or set min_real_per_batch >= 1."
            )
        return n_syn

    def batch_plan(self, epoch: int | None = None) -> list[tuple[int, int]]:
        """``[(num_real, num_synthetic), ...]`` for every batch of ``epoch`` (default: the current one)."""
        e = self.epoch if epoch is None else check_int("epoch", epoch, allow_zero=True)
        if e in self._plans:
            return self._plans[e]
        plan: list[tuple[int, int]] = []
        seen = 0
        while seen < self.real_per_rank:
            p = self.progress(e, seen)
            n_syn = self.synthetic_count(self.schedule(p), p)
            n_real = self.batch_size - n_syn
            take = min(n_real, self.real_per_rank - seen)
            if take < n_real and self.drop_last:
                break
            plan.append((take, n_syn))
            seen += take
        if not plan:
            raise ValueError(
                f"drop_last leaves no batch: {self.real_per_rank} real sample(s) per replica is fewer than the "
                f"{self.batch_size - self.synthetic_count(self.schedule(self.progress(e)))} real samples one batch "
                "needs. Use drop_last=False or a smaller batch_size."
            )
        if len(self._plans) > 64:
            self._plans.clear()
        self._plans[e] = plan
        return plan

    def __len__(self) -> int:
        return len(self.batch_plan())

    # ------------------------------------------------------------------ indices
    def _real_indices(self, epoch: int) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "real", epoch))
            order = torch.randperm(self.num_real, generator=g).tolist()
        else:
            order = list(range(self.num_real))
        total = self.real_per_rank * self.num_replicas
        if total > len(order):  # pad like DistributedSampler
            order = (order * math.ceil(total / len(order)))[:total]
        return order[self.rank : total : self.num_replicas]

    def _permutation(self, cycle: int) -> list[int]:
        if cycle not in self._permutations:
            if len(self._permutations) >= 4:
                self._permutations.pop(next(iter(self._permutations)))
            g = torch.Generator().manual_seed(derive_seed(self.seed, "synthetic", cycle))
            self._permutations[cycle] = torch.randperm(self.num_synthetic, generator=g).tolist()
        return self._permutations[cycle]

    def _synthetic_offset(self, epoch: int) -> int:
        """Synthetic samples one rank used in epochs ``0 .. epoch-1``."""
        known = max(e for e in self._synthetic_offsets if e <= epoch)
        offset = self._synthetic_offsets[known]
        for e in range(known, epoch):
            offset += sum(n for _, n in self.batch_plan(e))
            self._synthetic_offsets[e + 1] = offset
        return offset

    def _synthetic_index(self, position: int) -> int:
        cycle, within = divmod(position, self.num_synthetic)
        return self._permutation(cycle)[within]

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self.epoch
        real = self._real_indices(epoch)
        start = self._synthetic_offset(epoch)
        real_used = synthetic_used = 0
        for n_real, n_syn in self.batch_plan(epoch):
            batch = real[real_used : real_used + n_real]
            real_used += n_real
            for k in range(n_syn):
                # this rank's k-th synthetic sample: every num_replicas-th position of the shared stream
                position = (start + synthetic_used + k) * self.num_replicas + self.rank
                batch.append(self.num_real + self._synthetic_index(position))
            synthetic_used += n_syn
            yield batch

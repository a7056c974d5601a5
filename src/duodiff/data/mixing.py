"""Mix real and synthetic samples in every batch.

* :class:`MixedBatchSampler`: a batch sampler over ``ConcatDataset([real, synthetic])`` with an exact
  number of synthetic samples per batch, schedules, DDP sharding and seeded shuffling.
* :func:`mix_loaders`: wraps an existing real ``DataLoader`` and a synthetic loader or dataset and yields
  merged batches in the real loader's own structure (dict, tuple/list or tensor) plus a per-sample
  ``is_synthetic`` flag.

Rounding rule (both): counts are rounded half up, ``round_half_up(x) = floor(x + 0.5)``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, IterableDataset, Sampler, default_collate

from ..keys import IS_SYNTHETIC, SEED

__all__ = [
    "SCHEDULES",
    "FractionSchedule",
    "round_half_up",
    "MixedBatchSampler",
    "MixedLoader",
    "mix_loaders",
    "mark_real",
    "register_meta_tensor_collate",
]

SCHEDULES = ("constant", "linear", "cosine")
_UNITS = ("epoch", "step")


def register_meta_tensor_collate() -> None:
    """Make ``torch.utils.data.default_collate`` batch MONAI ``MetaTensor`` objects with one affine per sample.

    Torch's default collate stacks ``MetaTensor`` objects with ``torch.stack``, which keeps the *first* item's
    metadata for the whole batch: a batch of real and synthetic samples gets one affine (``(4, 4)``), and
    ``monai.data.decollate_batch`` then hands each sample a row of it. MONAI only registers its own
    ``MetaTensor`` collate (per-sample metadata, affine ``(B, 4, 4)``) once ``list_data_collate`` has run
    somewhere in the process, so the result depended on what ran before. Importing duodiff registers MONAI's
    function (the one ``monai.data.DataLoader`` uses) in torch's default collate map, in the main process and in
    every DataLoader worker that unpickles a duodiff dataset, so ``torch.utils.data.DataLoader``,
    ``monai.data.DataLoader`` and :func:`mix_loaders` batch ``MetaTensor`` objects the same way. A collate function
    registered for ``MetaTensor`` before is kept.
    """
    from monai.data.meta_tensor import MetaTensor
    from monai.data.utils import collate_meta_tensor_fn
    from torch.utils.data._utils.collate import default_collate_fn_map

    default_collate_fn_map.setdefault(MetaTensor, collate_meta_tensor_fn)


register_meta_tensor_collate()


def round_half_up(x: float) -> int:
    """``floor(x + 0.5)``: 0.5 -> 1, 1.5 -> 2, 1.49 -> 1 (with a 1e-9 tolerance for float error)."""
    return int(math.floor(x + 0.5 + 1e-9))


def _derive_seed(*parts: Any) -> int:
    digest = hashlib.sha256(":".join(str(p) for p in ("duodiff-mix", *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _check_fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}.")
    return float(value)


def _check_positive(name: str, value: Any, *, allow_zero: bool = False) -> int:
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
            self.start = _check_fraction("synthetic_fraction", synthetic_fraction)
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
                self.end = _check_fraction("final_synthetic_fraction", final_synthetic_fraction)
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


def _check_unit(schedule: FractionSchedule, num_epochs: int | None, unit: str) -> None:
    if unit not in _UNITS:
        raise ValueError(f"schedule_unit must be one of {list(_UNITS)}, got {unit!r}.")
    if not schedule.is_constant:
        if num_epochs is None:
            raise ValueError(
                f"A changing schedule ({schedule!r}) needs num_epochs, the planned length of training, to compute "
                "progress."
            )
        _check_positive("num_epochs", num_epochs)


def mark_real(item: Mapping[str, Any]) -> dict[str, Any]:
    """Add ``"is_synthetic": False`` and ``"seed": -1`` to a real sample dict (a copy).

    Synthetic items carry these keys; put this last in the real dataset's transform so real and
    synthetic dicts have the same keys and collate into one batch (``ConcatDataset`` +
    :class:`MixedBatchSampler`).
    """
    if not isinstance(item, Mapping):
        raise TypeError(f"mark_real expects a dict sample, got {type(item).__name__}.")
    return {**item, IS_SYNTHETIC: False, SEED: -1}


# ============================================================================================ sampler
class MixedBatchSampler(Sampler[list[int]]):
    """Batches of indices into ``ConcatDataset([real, synthetic])`` with a set number of synthetic samples.

    Every batch of an epoch holds ``n_syn = min(round_half_up(f * batch_size), batch_size -
    min_real_per_batch)`` synthetic samples, where ``f`` is the scheduled fraction; real samples fill the
    rest (reals first, then synthetic). An epoch is one pass over this rank's real samples, so the last
    batch may hold fewer real samples (unless ``drop_last``). Synthetic indices are drawn without
    replacement from a seeded permutation stream that continues across epochs (the synthetic set is
    used up before any index repeats).

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
        schedule_unit: ``"epoch"``: one fraction per epoch, progress ``epoch / (num_epochs - 1)``;
            ``"step"``: per batch, progress = share of all planned real samples seen before the batch.
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
        schedule_unit: str = "epoch",
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
        self.batch_size = _check_positive("batch_size", batch_size)
        self.schedule = FractionSchedule(schedule, synthetic_fraction=synthetic_fraction,
                                         final_synthetic_fraction=final_synthetic_fraction)
        _check_unit(self.schedule, num_epochs, schedule_unit)
        self.num_epochs, self.schedule_unit = num_epochs, schedule_unit
        self.min_real_per_batch = _check_positive("min_real_per_batch", min_real_per_batch, allow_zero=True)
        if min_real_per_batch > batch_size:
            raise ValueError(f"min_real_per_batch ({min_real_per_batch}) cannot exceed batch_size ({batch_size}).")
        self.shuffle, self.drop_last, self.seed = bool(shuffle), bool(drop_last), int(seed)
        if (rank is None) != (num_replicas is None):
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                rank = torch.distributed.get_rank() if rank is None else rank
                num_replicas = torch.distributed.get_world_size() if num_replicas is None else num_replicas
            else:
                raise ValueError("Pass rank and num_replicas together (torch.distributed is not initialised).")
        if rank is None:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                rank, num_replicas = torch.distributed.get_rank(), torch.distributed.get_world_size()
            else:
                rank, num_replicas = 0, 1
        self.num_replicas = _check_positive("num_replicas", num_replicas)
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
        self.epoch = _check_positive("epoch", epoch, allow_zero=True)

    # ------------------------------------------------------------------ plan
    def progress(self, epoch: int, real_seen: int = 0) -> float:
        """Training progress in [0, 1] for a batch of ``epoch`` after ``real_seen`` real samples of this rank."""
        if self.schedule.is_constant or self.num_epochs is None:
            return 0.0
        if self.schedule_unit == "epoch":
            return min(epoch / max(self.num_epochs - 1, 1), 1.0)
        total = self.num_epochs * self.real_per_rank
        return min((epoch * self.real_per_rank + real_seen) / max(total - 1, 1), 1.0)

    def synthetic_count(self, fraction: float, progress: float = 0.0) -> int:
        """Synthetic samples in a full batch for ``fraction`` (the rounding rule)."""
        n_syn = min(round_half_up(fraction * self.batch_size), self.batch_size - self.min_real_per_batch)
        if n_syn >= self.batch_size:
            raise ValueError(
                f"synthetic fraction {fraction:.4g} (progress {progress:.3g}) leaves no real sample in a batch of "
                f"{self.batch_size}; lower the fraction or set min_real_per_batch >= 1."
            )
        return n_syn

    def batch_plan(self, epoch: int | None = None) -> list[tuple[int, int]]:
        """``[(num_real, num_synthetic), ...]`` for every batch of ``epoch`` (default: the current one)."""
        e = self.epoch if epoch is None else _check_positive("epoch", epoch, allow_zero=True)
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
            g = torch.Generator().manual_seed(_derive_seed(self.seed, "real", epoch))
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
            g = torch.Generator().manual_seed(_derive_seed(self.seed, "synthetic", cycle))
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


# ============================================================================================ loaders
_LEAF_TYPES = (str, bytes, int, float, bool, type(None))


def _is_leaf_list(x: Any) -> bool:
    """A collated list of per-sample values (strings, numbers), as opposed to a list of tensors/structures."""
    return isinstance(x, list) and all(isinstance(v, _LEAF_TYPES) for v in x)


def _batch_len(x: Any, path: str = "batch") -> int:
    if isinstance(x, torch.Tensor):
        if x.ndim == 0:
            raise ValueError(f"{path} is a 0-d tensor; batches need a leading batch dimension.")
        return int(x.shape[0])
    if _is_leaf_list(x):
        return len(x)
    if isinstance(x, Mapping):
        for k, v in x.items():
            try:
                return _batch_len(v, f"{path}[{k!r}]")
            except TypeError:
                continue
    if isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            try:
                return _batch_len(v, f"{path}[{i}]")
            except TypeError:
                continue
    raise TypeError(f"Cannot find the batch size of {path} ({type(x).__name__}); batches must contain tensors.")


def _slice(x: Any, start: int, stop: int) -> Any:
    if isinstance(x, torch.Tensor):
        return x[start:stop]
    if _is_leaf_list(x):
        return x[start:stop]
    if isinstance(x, Mapping):
        return {k: _slice(v, start, stop) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(_slice(v, start, stop) for v in x)
    if isinstance(x, list):
        return [_slice(v, start, stop) for v in x]
    raise TypeError(f"Cannot split a batch element of type {type(x).__name__}; use tensors, dicts, tuples or lists.")


def _cat_tensors(parts: Sequence[torch.Tensor], path: str) -> torch.Tensor:
    from monai.data import MetaTensor

    first = parts[0]
    for other in parts[1:]:
        if tuple(other.shape[1:]) != tuple(first.shape[1:]) or other.dtype != first.dtype:
            raise ValueError(
                f"{path}: real samples have shape {tuple(first.shape[1:])} and dtype {first.dtype}, synthetic ones "
                f"{tuple(other.shape[1:])} and {other.dtype}. Make them match with a transform on one side, e.g. "
                "monai.transforms.EnsureTyped(keys, dtype=...) or ResizeWithPadOrCropd(keys, spatial_size=...)."
            )
    if not isinstance(first, MetaTensor):  # a plain real tensor: the result is plain too
        return torch.cat([p.as_tensor() if isinstance(p, MetaTensor) else p for p in parts])
    if not all(isinstance(p, MetaTensor) for p in parts):
        raise TypeError(
            f"{path}: the real batch holds a MetaTensor but the synthetic one a plain tensor; collate both the "
            "same way (e.g. monai.data.DataLoader / list_data_collate for both)."
        )
    # one MetaTensor per sample, in order, then batched again: every sample keeps its own affine. A part
    # that is not a batch (stacked without MONAI's collate) holds one affine for all its samples.
    from monai.data import decollate_batch
    from monai.data.utils import collate_meta_tensor

    items = [item for p in parts for item in (decollate_batch(p, detach=False) if p.is_batch
                                               else [p[i] for i in range(p.shape[0])])]
    return collate_meta_tensor(items)


def _merge(real: Any, synthetic: Any, path: str) -> Any:
    """Concatenate a real and a synthetic batch of the same structure along the batch dimension."""
    if isinstance(real, torch.Tensor):
        if not isinstance(synthetic, torch.Tensor):
            raise TypeError(f"{path}: the real batch holds a tensor, the synthetic one a {type(synthetic).__name__}.")
        return _cat_tensors([real, synthetic], path)
    if _is_leaf_list(real):
        if not _is_leaf_list(synthetic):
            raise TypeError(f"{path}: the real batch holds a list of values, the synthetic one a "
                            f"{type(synthetic).__name__}.")
        return real + synthetic
    if isinstance(real, Mapping):
        if not isinstance(synthetic, Mapping):
            raise TypeError(f"{path}: the real batch is a dict, the synthetic one a {type(synthetic).__name__}.")
        missing = [k for k in real if k not in synthetic]
        extra = [k for k in synthetic if k not in real]
        if missing or extra:
            raise ValueError(
                f"{path}: keys differ between real and synthetic batches: missing in synthetic {missing}, only in "
                f"synthetic {extra}. Add or drop keys with a transform (e.g. monai.transforms.DeleteItemsd) so both "
                "have the same keys."
            )
        return {k: _merge(real[k], synthetic[k], f"{path}[{k!r}]") for k in real}
    if isinstance(real, (list, tuple)):
        if not isinstance(synthetic, (list, tuple)) or len(synthetic) != len(real):
            what = (f"a sequence of {len(synthetic)}" if isinstance(synthetic, (list, tuple))
                    else type(synthetic).__name__)
            raise ValueError(f"{path}: the real batch is a sequence of {len(real)} elements, the synthetic one {what}.")
        merged = [_merge(a, b, f"{path}[{i}]") for i, (a, b) in enumerate(zip(real, synthetic))]
        return tuple(merged) if isinstance(real, tuple) else merged
    raise TypeError(f"{path}: cannot merge batch elements of type {type(real).__name__}.")


class _SyntheticSupply:
    """Hands out ``n`` synthetic samples at a time as one collated batch.

    From a DataLoader (or any re-iterable of batches): batches are split and their leftovers kept for
    the next request; the loader restarts when exhausted. From a Dataset: map-style items are drawn
    from a seeded permutation stream, iterable ones in order; items are collated with ``collate_fn``.
    """

    def __init__(self, synthetic: Any, collate_fn: Callable[[list[Any]], Any], seed: int) -> None:
        if isinstance(synthetic, DataLoader):
            self.mode = "batches"
        elif isinstance(synthetic, IterableDataset):
            self.mode = "iterable"
        elif isinstance(synthetic, Dataset) and hasattr(synthetic, "__len__"):
            self.mode = "map"
            if len(synthetic) < 1:
                raise ValueError("The synthetic dataset is empty.")
        else:
            raise TypeError(
                "synthetic must be a torch DataLoader or Dataset (e.g. duodiff.SyntheticPairDataset), got "
                f"{type(synthetic).__name__}."
            )
        self.source = synthetic
        self.collate_fn = collate_fn
        self.seed = seed
        self._iterator: Iterator[Any] | None = None
        self._leftover: Any = None
        self._position = 0
        self._perm: list[int] = []
        self._perm_cycle = -1

    def set_epoch(self, epoch: int) -> None:
        target = self.source.dataset if isinstance(self.source, DataLoader) else self.source
        for obj in (target, getattr(self.source, "sampler", None), getattr(self.source, "batch_sampler", None)):
            if obj is not None and hasattr(obj, "set_epoch"):
                obj.set_epoch(epoch)

    def _next_from_iterator(self) -> Any:
        for _ in range(2):
            if self._iterator is None:
                self._iterator = iter(self.source)
            try:
                return next(self._iterator)
            except StopIteration:
                self._iterator = None
        raise ValueError("The synthetic loader/dataset yields nothing; it must produce at least one sample.")

    def _map_item(self) -> Any:
        n = len(self.source)
        cycle, within = divmod(self._position, n)
        if self._perm_cycle != cycle:
            g = torch.Generator().manual_seed(_derive_seed(self.seed, "mix_loaders", cycle))
            self._perm, self._perm_cycle = torch.randperm(n, generator=g).tolist(), cycle
        self._position += 1
        return self.source[self._perm[within]]

    def take(self, n: int) -> Any:
        if self.mode == "map":
            return self.collate_fn([self._map_item() for _ in range(n)])
        if self.mode == "iterable":
            return self.collate_fn([self._next_from_iterator() for _ in range(n)])
        pieces, need = [], n
        while need > 0:
            if self._leftover is None:
                self._leftover = self._next_from_iterator()
            size = _batch_len(self._leftover, "synthetic batch")
            take = min(need, size)
            pieces.append(_slice(self._leftover, 0, take))
            self._leftover = _slice(self._leftover, take, size) if take < size else None
            need -= take
        out = pieces[0]
        for piece in pieces[1:]:
            out = _merge(out, piece, "synthetic batch")
        return out

    def close(self) -> None:
        """Drop the open synthetic iterator: stops a stream's generation thread, shuts down loader workers."""
        iterator, self._iterator, self._leftover = self._iterator, None, None
        if iterator is not None and hasattr(iterator, "close"):
            iterator.close()  # a generator (streaming dataset): runs its cleanup now
        elif iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()  # a multi-process DataLoader iterator


class MixedLoader:
    """Iterable returned by :func:`mix_loaders`: one pass over the real loader per iteration."""

    def __init__(self, real_loader: Any, supply: _SyntheticSupply, schedule: FractionSchedule,
                 num_epochs: int | None, schedule_unit: str, keys: Sequence[str] | None,
                 flag_key: str | None) -> None:
        self.real_loader = real_loader
        self.supply = supply
        self.schedule = schedule
        self.num_epochs = num_epochs
        self.schedule_unit = schedule_unit
        self.keys = tuple(keys) if keys is not None else None
        self.flag_key = flag_key
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.real_loader)

    def close(self) -> None:
        """Release the synthetic source now: stop a streaming dataset's generation thread and shut down a
        synthetic DataLoader's workers (otherwise they live, by design, until the loader is garbage-collected,
        so a stream keeps producing between epochs). Iterating again afterwards reopens the source."""
        self.supply.close()

    def __enter__(self) -> MixedLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"MixedLoader(real={type(self.real_loader).__name__}, synthetic={self.supply.mode}, "
                f"schedule={self.schedule!r}, unit={self.schedule_unit!r}, epoch={self.epoch})")

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch of the schedule and forward it to ``set_epoch`` of the real/synthetic samplers/datasets."""
        self.epoch = _check_positive("epoch", epoch, allow_zero=True)
        for obj in (getattr(self.real_loader, "sampler", None), getattr(self.real_loader, "batch_sampler", None),
                    getattr(self.real_loader, "dataset", None)):
            if obj is not None and hasattr(obj, "set_epoch"):
                obj.set_epoch(epoch)
        self.supply.set_epoch(epoch)

    def progress(self, step: int) -> float:
        """Training progress in [0, 1] at ``step`` of the current epoch."""
        if self.schedule.is_constant or self.num_epochs is None:
            return 0.0
        if self.schedule_unit == "epoch":
            return min(self.epoch / max(self.num_epochs - 1, 1), 1.0)
        steps = len(self.real_loader)
        return min((self.epoch * steps + step) / max(self.num_epochs * steps - 1, 1), 1.0)

    @staticmethod
    def synthetic_count(fraction: float, real_batch_size: int) -> int:
        """Synthetic samples added to a real batch: ``round_half_up(f * B_real / (1 - f))``."""
        if fraction >= 1.0:
            raise ValueError(
                f"synthetic fraction {fraction:.4g} is not possible with mix_loaders, which keeps every real sample; "
                "use a fraction < 1."
            )
        return round_half_up(fraction * real_batch_size / (1.0 - fraction))

    def _as_real_structure(self, real: Any, syn: Any) -> Any:
        if isinstance(syn, Mapping) and not isinstance(real, Mapping):
            if self.keys is None:
                kind = "tuples/lists" if isinstance(real, (list, tuple)) else type(real).__name__
                raise ValueError(
                    f"The real batches are {kind} but the synthetic ones are dicts with keys {list(syn)}; pass "
                    "keys=('image', 'label') (the synthetic keys in the order of the real batch's elements)."
                )
            missing = [k for k in self.keys if k not in syn]
            if missing:
                raise ValueError(f"keys {missing} are not in the synthetic batches (they have {list(syn)}).")
            if isinstance(real, torch.Tensor):
                if len(self.keys) != 1:
                    raise ValueError(f"The real batches are single tensors; pass one key, got keys={self.keys}.")
                return syn[self.keys[0]]
            return [syn[k] for k in self.keys]
        if isinstance(syn, Mapping) and isinstance(real, Mapping):
            drop = {self.flag_key} if self.flag_key is not None else set()
            if SEED not in real:
                drop.add(SEED)  # duodiff metadata the real data does not have
            return {k: v for k, v in syn.items() if k not in drop}
        return syn

    def _flags(self, batch: Any, n: int, value: bool) -> torch.Tensor:
        if isinstance(batch, Mapping) and self.flag_key in batch:
            return torch.as_tensor(batch[self.flag_key]).to(torch.bool).reshape(n)
        return torch.full((n,), value, dtype=torch.bool)

    def __iter__(self) -> Iterator[Any]:
        for step, real in enumerate(self.real_loader):
            n_real = _batch_len(real, "real batch")
            f = self.schedule(self.progress(step))
            n_syn = self.synthetic_count(f, n_real)
            flags = [self._flags(real, n_real, False)]
            body = {k: v for k, v in real.items() if k != self.flag_key} if isinstance(real, Mapping) else real
            if n_syn > 0:
                syn_raw = self.supply.take(n_syn)
                flags.append(self._flags(syn_raw, n_syn, True))
                syn = self._as_real_structure(body, syn_raw)
                body = _merge(body, syn, "batch")
            yield self._with_flags(body, torch.cat(flags))
        self.epoch += 1

    def _with_flags(self, batch: Any, flags: torch.Tensor) -> Any:
        if self.flag_key is None:
            return batch
        if isinstance(batch, Mapping):
            return {**batch, self.flag_key: flags}
        if isinstance(batch, tuple):
            return (*batch, flags)
        if isinstance(batch, list):
            return [*batch, flags]
        return (batch, flags)


def mix_loaders(
    real_loader: Any,
    synthetic: Any,
    *,
    synthetic_fraction: float | None = None,
    schedule: str | Callable[[float], float] = "constant",
    final_synthetic_fraction: float | None = None,
    num_epochs: int | None = None,
    schedule_unit: str = "step",
    keys: Sequence[str] | None = None,
    flag_key: str | None = IS_SYNTHETIC,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    seed: int = 0,
) -> MixedLoader:
    """Add synthetic samples to every batch of an existing real DataLoader.

    Each real batch of ``B`` samples is extended by ``n = round_half_up(f * B / (1 - f))`` synthetic
    samples, so ``f`` is the synthetic share of the merged batch (exact when ``n`` is whole, e.g.
    ``f=0.25`` with ``B=3`` gives 3 real + 1 synthetic). Every real sample is kept; one pass over the
    merged loader is one pass over ``real_loader`` (same length). The synthetic source is never
    restarted between epochs, so a stream keeps producing fresh pairs.

    Batches keep the real loader's structure:

    * dict batches get a bool ``(B + n,)`` tensor under ``flag_key`` (a flag already in the real or
      synthetic batches is kept; ``"seed"`` is dropped from synthetic batches when the real ones lack it);
    * tuple/list batches get the flag appended as the last element: ``for x, y, is_syn in loader``;
    * tensor batches become ``(tensor, flag)``.

    Pass ``flag_key=None`` to add no flag. Keys, shapes (after the batch dimension), dtypes and tensor
    kinds must match between real and synthetic batches, else a ``ValueError``/``TypeError`` names them.

    Example:
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from duodiff.testing import tiny_pipeline
        >>> from duodiff import SyntheticPairDataset
        >>> real = DataLoader(TensorDataset(torch.rand(6, 1, 16, 16, 16), torch.zeros(6, 1, 16, 16, 16,
        ...                   dtype=torch.long)), batch_size=3)
        >>> syn = SyntheticPairDataset(tiny_pipeline(), num_samples=None, num_inference_steps=2)
        >>> x, y, is_syn = next(iter(mix_loaders(real, syn, synthetic_fraction=0.25, keys=("image", "label"))))
        >>> tuple(x.shape), is_syn.tolist()
        ((4, 1, 16, 16, 16), [False, False, False, True])

    Args:
        real_loader: the user's DataLoader (any re-iterable of batches; needs ``len`` for step schedules).
        synthetic: a DataLoader of synthetic batches, or a Dataset (map-style items are drawn in a seeded
            random order; streams in order) whose items are collated with ``collate_fn``.
        synthetic_fraction: synthetic share of each merged batch, in [0, 1) (start value of ramps).
        schedule: ``"constant"``, ``"linear"``, ``"cosine"`` or a callable ``progress -> fraction``.
        final_synthetic_fraction: end value of ``"linear"``/``"cosine"``.
        num_epochs: planned epochs; needed by changing schedules.
        schedule_unit: ``"step"`` (progress per batch) or ``"epoch"``.
        keys: when real batches are tuples/lists (or tensors) and synthetic ones dicts: the synthetic keys
            to take, in the order of the real batch's elements, e.g. ``("image", "label")``.
        flag_key: name of the per-sample flag (``None``: add none).
        collate_fn: collates synthetic dataset items (default: the real loader's ``collate_fn``, else
            ``torch.utils.data.default_collate``).
        seed: seed of the order in which map-style synthetic items are drawn.
    """
    sched = FractionSchedule(schedule, synthetic_fraction=synthetic_fraction,
                             final_synthetic_fraction=final_synthetic_fraction)
    _check_unit(sched, num_epochs, schedule_unit)
    if not sched.is_constant and schedule_unit == "step" and not hasattr(real_loader, "__len__"):
        raise TypeError("A step schedule needs len(real_loader); use schedule_unit='epoch' for loaders without len.")
    if not hasattr(real_loader, "__iter__"):
        raise TypeError(f"real_loader must be an iterable of batches (a DataLoader), got {type(real_loader).__name__}.")
    if flag_key is not None and not isinstance(flag_key, str):
        raise TypeError(f"flag_key must be a string or None, got {flag_key!r}.")
    if keys is not None and (isinstance(keys, str) or not all(isinstance(k, str) for k in keys) or not keys):
        raise TypeError(f"keys must be a non-empty sequence of key names such as ('image', 'label'), got {keys!r}.")
    collate = collate_fn or getattr(real_loader, "collate_fn", None) or default_collate
    supply = _SyntheticSupply(synthetic, collate, int(seed))
    return MixedLoader(real_loader, supply, sched, num_epochs, schedule_unit, keys, flag_key)

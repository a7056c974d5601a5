"""`mix_loaders`: add synthetic samples to every batch of an existing real DataLoader.

The two ways to mix real and synthetic samples share one definition of schedule progress and of the
synthetic count of a batch (:mod:`duodiff.data.schedule`), so one ``synthetic_fraction`` is the same share
in both:

* :class:`~duodiff.MixedBatchSampler` (:mod:`duodiff.data.sampler`): a batch sampler over
  ``ConcatDataset([real, synthetic])`` with a fixed batch size.
* :func:`mix_loaders` (here): wraps a real ``DataLoader`` and a synthetic loader or dataset and yields
  merged batches in the real loader's own structure (dict, tuple/list or tensor) plus a per-sample
  ``is_synthetic`` flag. Batches are merged by :mod:`duodiff.data.batches`.

The names this module held before the split (``MixedBatchSampler``, ``FractionSchedule``, ...) are still
importable from it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from ..keys import IS_SYNTHETIC, SEED
from .batches import batch_len, merge_batches, register_meta_tensor_collate, slice_batch
from .sampler import MixedBatchSampler, derive_seed, mark_real
from .schedule import (
    DEFAULT_SCHEDULE_UNIT,
    SCHEDULES,
    FractionSchedule,
    check_int,
    check_schedule_unit,
    round_half_up,
    schedule_progress,
    synthetic_count_for_real,
)

__all__ = [
    "MixedLoader",
    "mix_loaders",
    # re-exported: importable from here since before the split
    "SCHEDULES",
    "FractionSchedule",
    "round_half_up",
    "MixedBatchSampler",
    "mark_real",
    "register_meta_tensor_collate",
]


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
            g = torch.Generator().manual_seed(derive_seed(self.seed, "mix_loaders", cycle))
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
            size = batch_len(self._leftover, "synthetic batch")
            take = min(need, size)
            pieces.append(slice_batch(self._leftover, 0, take))
            self._leftover = slice_batch(self._leftover, take, size) if take < size else None
            need -= take
        out = pieces[0]
        for piece in pieces[1:]:
            out = merge_batches(out, piece, "synthetic batch")
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
        self.epoch = check_int("epoch", epoch, allow_zero=True)
        for obj in (getattr(self.real_loader, "sampler", None), getattr(self.real_loader, "batch_sampler", None),
                    getattr(self.real_loader, "dataset", None)):
            if obj is not None and hasattr(obj, "set_epoch"):
                obj.set_epoch(epoch)
        self.supply.set_epoch(epoch)

    def progress(self, step: int) -> float:
        """Training progress in [0, 1] at ``step`` of the current epoch."""
        if self.schedule.is_constant:
            return 0.0
        per_epoch = len(self.real_loader) if self.schedule_unit == "step" else 1
        return schedule_progress(self.epoch, num_epochs=self.num_epochs, unit=self.schedule_unit, done=step,
                                 per_epoch=per_epoch)

    @staticmethod
    def synthetic_count(fraction: float, real_batch_size: int) -> int:
        """Synthetic samples added to a real batch: ``round_half_up(f * B_real / (1 - f))``, so that the merged
        batch holds the shared rule's count for its size (:func:`~duodiff.data.schedule.synthetic_count_for_real`)."""
        return synthetic_count_for_real(fraction, real_batch_size)

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
            n_real = batch_len(real, "real batch")
            f = self.schedule(self.progress(step))
            n_syn = self.synthetic_count(f, n_real)
            flags = [self._flags(real, n_real, False)]
            body = {k: v for k, v in real.items() if k != self.flag_key} if isinstance(real, Mapping) else real
            if n_syn > 0:
                syn_raw = self.supply.take(n_syn)
                flags.append(self._flags(syn_raw, n_syn, True))
                syn = self._as_real_structure(body, syn_raw)
                body = merge_batches(body, syn, "batch")
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
    schedule_unit: str = DEFAULT_SCHEDULE_UNIT,
    keys: Sequence[str] | None = None,
    flag_key: str | None = IS_SYNTHETIC,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    seed: int = 0,
) -> MixedLoader:
    """Add synthetic samples to every batch of an existing real DataLoader.

    Each real batch of ``B`` samples is extended by ``n = round_half_up(f * B / (1 - f))`` synthetic
    samples, so ``f`` is the synthetic share of the merged batch (exact when ``n`` is whole, e.g.
    ``f=0.25`` with ``B=3`` gives 3 real + 1 synthetic). The merged batch of ``B + n`` samples always holds
    ``round_half_up(f * (B + n)) == n`` synthetic ones, the count :class:`~duodiff.MixedBatchSampler` gives a
    batch of that size (:mod:`duodiff.data.schedule`). Every real sample is kept; one pass over the
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
        schedule_unit: ``"epoch"`` (default, as in :class:`~duodiff.MixedBatchSampler`): one fraction per epoch,
            progress ``epoch / (num_epochs - 1)``; ``"step"``: per batch, progress = share of the planned real
            batches before this one (needs ``len(real_loader)``).
        keys: when real batches are tuples/lists (or tensors) and synthetic ones dicts: the synthetic keys
            to take, in the order of the real batch's elements, e.g. ``("image", "label")``.
        flag_key: name of the per-sample flag (``None``: add none).
        collate_fn: collates synthetic dataset items (default: the real loader's ``collate_fn``, else
            ``torch.utils.data.default_collate``).
        seed: seed of the order in which map-style synthetic items are drawn.
    """
    sched = FractionSchedule(schedule, synthetic_fraction=synthetic_fraction,
                             final_synthetic_fraction=final_synthetic_fraction)
    check_schedule_unit(sched, num_epochs, schedule_unit)
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

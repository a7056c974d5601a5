"""`StreamingSyntheticPairDataset`: an endless stream of fresh synthetic pairs, generated while you train."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..distributed import group_rank
from ..schedulers import DEFAULT_NUM_INFERENCE_STEPS, DEFAULT_SCHEDULER
from ..threads import GENERATION_THREADS
from .generation import GeneratorBacked, PairGenerator, check_device_usable, check_seed, check_transform
from .pool import GenerationPool

if TYPE_CHECKING:  # pragma: no cover
    from ..pipeline import DuoDiffusion

__all__ = ["StreamingSyntheticPairDataset", "stream_position", "EPOCH_SEED_STRIDE"]

#: ``set_epoch(e)`` on a streaming dataset starts its seeds at ``seed + e * EPOCH_SEED_STRIDE``.
EPOCH_SEED_STRIDE = 2**32


def _resolve_rank(rank: int | None, world_size: int | None, fallback: tuple[int, int] | None) -> tuple[int, int]:
    """(rank, world_size): explicit arguments, else torch.distributed, else ``fallback``, else (0, 1)."""
    if rank is not None and world_size is not None:
        return rank, world_size
    return group_rank() or fallback or (0, 1)


def _check_rank(rank: int | None, world_size: int | None) -> None:
    if (rank is None) != (world_size is None):
        raise ValueError(f"Pass rank and world_size together (got rank={rank!r}, world_size={world_size!r}).")
    if world_size is not None:
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}.")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}.")


def stream_position(rank: int = 0, world_size: int = 1) -> tuple[int, int]:
    """This process's stream: ``(stream_index, num_streams)`` over DDP ranks and DataLoader workers.

    Stream ``k`` of ``S`` yields seed offsets ``k, k + S, k + 2S, ...``, so the streams of all ranks and
    workers together cover ``0, 1, 2, ...`` with no offset repeated or skipped.
    """
    info = get_worker_info()
    worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * num_workers + worker, world_size * num_workers


class StreamingSyntheticPairDataset(GeneratorBacked, IterableDataset):
    """Endless synthetic (image, label) pairs from a :class:`~duodiff.DuoDiffusion` model, made while you train.

    Why a stream: every pair is new (no synthetic sample is seen twice), and generation overlaps training.
    Iterating starts a :class:`~duodiff.data.pool.GenerationPool`: a thread that generates
    ``generation_batch_size`` pairs at a time on the model's device (its own CUDA stream on GPUs) and keeps up
    to ``pool_size`` of them ready; the consumer takes pairs in seed order and only waits when the pool is
    empty. Closing (or dropping) the iterator stops the thread after its current generation call and waits
    for that call; so does interpreter exit. Errors in the thread are re-raised in the consumer.
    ``SyntheticPairDataset(pipe, num_samples=None, ...)`` builds one too.

    Seeds: rank ``r`` of ``R`` with DataLoader worker ``w`` of ``W`` uses seeds ``seed + k + j * R * W``
    (``k = r * W + w``), so no seed is made twice and none is skipped. The rank comes from
    ``rank``/``world_size``, else ``torch.distributed``. On CUDA prefer ``num_workers=0``: the thread already
    overlaps generation with training.

    Example:
        >>> from duodiff.testing import tiny_pipeline
        >>> stream = StreamingSyntheticPairDataset(tiny_pipeline(), seed=5, num_inference_steps=2)
        >>> [item["seed"] for item in itertools.islice(stream, 3)]
        [5, 6, 7]

    Args:
        pipe: the model. Generation runs on ``pipe.device``.
        seed: first seed of the stream.
        num_inference_steps, scheduler, dtype, conditioning_scale, sample_kwargs, num_threads: as in
            :class:`~duodiff.SyntheticPairDataset`.
        transform: callable applied to every item dict (in the generation thread).
        pool_size: number of ready pairs kept in memory (at most ``pool_size + generation_batch_size``
            pairs exist at once).
        generation_batch_size: pairs per generation call. Values of streamed pairs are reproducible for a
            fixed batch size; with ``1`` they equal the map-style items bit for bit.
        rank: this process's DDP rank (default: from ``torch.distributed``).
        world_size: number of DDP processes (pass together with ``rank``).
    """

    def __init__(
        self,
        pipe: DuoDiffusion,
        *,
        seed: int = 0,
        num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
        scheduler: str | None = DEFAULT_SCHEDULER,
        dtype: str | torch.dtype | None = "auto",
        conditioning_scale: float = 1.0,
        transform: Callable[[dict[str, Any]], Any] | None = None,
        pool_size: int = 16,
        generation_batch_size: int = 4,
        rank: int | None = None,
        world_size: int | None = None,
        sample_kwargs: dict[str, Any] | None = None,
        num_threads: int | None = GENERATION_THREADS,
    ) -> None:
        seed = check_seed(seed)
        check_transform(transform)
        for name, value in (("pool_size", pool_size), ("generation_batch_size", generation_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        _check_rank(rank, world_size)
        self.generator = PairGenerator(pipe, num_inference_steps=num_inference_steps, scheduler=scheduler,
                                       dtype=dtype, conditioning_scale=conditioning_scale,
                                       sample_kwargs=sample_kwargs, num_threads=num_threads)
        self.seed = seed
        self.transform = transform
        self.pool_size = pool_size
        self.generation_batch_size = generation_batch_size
        self.rank, self.world_size = rank, world_size
        self._rank_at_init = _resolve_rank(None, None, None) if rank is None else None
        # The epoch lives in a shared-memory tensor: DataLoader workers, forked or spawned, hold this very
        # memory (torch hands shared tensors to workers by handle), so persistent workers read the epoch the
        # main process set with set_epoch() when they start their next iteration.
        self._shared_epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def __repr__(self) -> str:
        return (f"StreamingSyntheticPairDataset(seed={self.seed}, {self._describe()}, pool_size={self.pool_size}, "
                f"generation_batch_size={self.generation_batch_size})")

    def __len__(self) -> int:
        raise TypeError(
            "A streaming SyntheticPairDataset (num_samples=None) is endless and has no length; take as many "
            "items as you need, or pass num_samples=N for a map-style dataset."
        )

    def __getitem__(self, index: int) -> Any:
        raise TypeError(
            "A streaming SyntheticPairDataset (num_samples=None) cannot be indexed; iterate over it, or pass "
            "num_samples=N for a map-style dataset where item i is seed + i."
        )

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration use fresh seeds (``seed + epoch * 2**32 + ...``), in DataLoader workers too.

        The epoch is kept in shared memory, so workers started before the call (``persistent_workers=True``)
        use it from their next iteration on. Call it before ``iter(loader)``; an iteration already running
        keeps its seeds. Without it, a new iteration replays the same sequence.
        """
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}.")
        self._shared_epoch.fill_(epoch)

    def seed_stream(self) -> Iterator[int]:
        """The seeds this process (rank + DataLoader worker) yields, in order (endless)."""
        rank, world = _resolve_rank(self.rank, self.world_size, self._rank_at_init)
        k, streams = stream_position(rank, world)
        base = self.seed + int(self._shared_epoch.item()) * EPOCH_SEED_STRIDE + k
        return (base + m * streams for m in itertools.count())

    def _items(self, seeds: Iterator[int]) -> Iterator[Any]:
        """Transformed items of ``seeds``, ``generation_batch_size`` per generation call (runs in the pool thread)."""
        while True:
            for item in self._generate(list(itertools.islice(seeds, self.generation_batch_size))):
                yield self.transform(item) if self.transform is not None else item

    def __iter__(self) -> Iterator[Any]:
        check_device_usable(self.pipe)
        with GenerationPool(self._items(self.seed_stream()), pool_size=self.pool_size,
                            device=self.pipe.device) as pool:
            yield from pool

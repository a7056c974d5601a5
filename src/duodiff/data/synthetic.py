"""`SyntheticPairDataset`: synthetic (image, label) pairs as a PyTorch dataset.

Two modes, chosen by ``num_samples``:

* **map-style** (``num_samples=N``): item ``i`` is the pair made from seed ``seed + i``, generated on
  demand (optionally cached on disk). The same ``i`` gives the same pair in every run, every DataLoader
  worker and from the cache.
* **streaming** (``num_samples=None``): an endless iterable. A background thread keeps a pool of
  up to ``pool_size`` ready pairs, generated on the model's device while the consumer trains.

Items are MONAI-style dicts ``{"image": MetaTensor (C, H, W, D) float32 in [0, 1], "label": MetaTensor
(1, H, W, D) int64, "is_synthetic": True, "seed": int}``; the MetaTensors carry the affine.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import queue
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .. import keys
from ..fingerprint import model_fingerprint
from ..threads import GENERATION_THREADS, check_num_threads, intra_op_threads

if TYPE_CHECKING:  # pragma: no cover
    from ..pipeline import DuoDiffusion
    from .folders import Case

__all__ = ["SyntheticPairDataset", "StreamingSyntheticPairDataset", "stream_position", "EPOCH_SEED_STRIDE"]

#: ``set_epoch(e)`` on a streaming dataset starts its seeds at ``seed + e * EPOCH_SEED_STRIDE``.
EPOCH_SEED_STRIDE = 2**32

_CACHE_FORMAT = "duodiff-pair-v1"
_SEED_IN_NAME = re.compile(r"_s(\d+)$")
_UNSET = object()


def _resolve_rank(rank: int | None, world_size: int | None, fallback: tuple[int, int] | None) -> tuple[int, int]:
    """(rank, world_size): explicit arguments, else torch.distributed, else ``fallback``, else (0, 1)."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return fallback or (0, 1)


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


def _check_device_usable(pipe: DuoDiffusion) -> None:
    """Fail clearly (instead of a cryptic CUDA error) when generating on CUDA in a forked worker."""
    device = pipe.device
    if device.type == "cuda" and torch.cuda._is_in_bad_fork():
        info = get_worker_info()
        where = f"DataLoader worker {info.id}" if info is not None else "a forked process"
        raise RuntimeError(
            f"SyntheticPairDataset cannot generate on {device} inside {where}: CUDA cannot be used in a process "
            "forked after CUDA was initialised. Supported setups: (1) stream in the main process, "
            "SyntheticPairDataset(pipe, num_samples=None) with DataLoader(num_workers=0) — its background pool "
            "already overlaps generation with training; (2) DataLoader(..., num_workers=k, "
            "multiprocessing_context='spawn'); (3) generate on CPU in workers (pipe.to('cpu')); or (4) write "
            "pairs with `duodiff sample` and read them with SyntheticPairDataset.from_folder()."
        )


def _as_item(image: torch.Tensor, label: torch.Tensor, affine: np.ndarray | torch.Tensor, seed: int,
             label_affine: np.ndarray | torch.Tensor | None = None) -> dict[str, Any]:
    from monai.data import MetaTensor

    aff = torch.as_tensor(np.asarray(affine), dtype=torch.float64)
    laff = aff if label_affine is None else torch.as_tensor(np.asarray(label_affine), dtype=torch.float64)
    return {
        keys.IMAGE: MetaTensor(image, affine=aff.clone()),
        keys.LABEL: MetaTensor(label, affine=laff.clone()),
        keys.IS_SYNTHETIC: True,
        keys.SEED: int(seed),
    }


class SyntheticPairDataset(Dataset):
    """Synthetic (image, label) pairs from a :class:`~duodiff.DuoDiffusion` model, as a PyTorch dataset.

    ``num_samples=N`` gives a map-style dataset of ``N`` pairs (item ``i`` is made from seed ``seed + i``);
    ``num_samples=None`` gives an endless :class:`StreamingSyntheticPairDataset` (a subclass, and an
    ``IterableDataset``) fed by a background generation thread.

    Items are dicts ``{"image": MetaTensor (C, H, W, D) float32 in [0, 1], "label": MetaTensor (1, H, W, D)
    int64, "is_synthetic": True, "seed": int}`` with the model's affine, passed through ``transform``
    when one is given.

    Workers and DDP: a map-style dataset is sharded by the sampler (``DistributedSampler`` or
    :class:`~duodiff.MixedBatchSampler`); a streaming one shards itself: rank ``r`` of ``R`` with
    worker ``w`` of ``W`` uses seeds ``seed + k + j * R * W`` (``k = r * W + w``), so no seed is made twice
    and none is skipped. The rank comes from ``rank``/``world_size``, else ``torch.distributed``.

    Example:
        >>> from duodiff.testing import tiny_pipeline
        >>> ds = SyntheticPairDataset(tiny_pipeline(), num_samples=8, num_inference_steps=2)
        >>> item = ds[3]
        >>> tuple(item["image"].shape), item["seed"], item["is_synthetic"]
        ((1, 16, 16, 16), 3, True)

    Args:
        pipe: the model. Generation runs on ``pipe.device``.
        num_samples: number of pairs (map-style), or ``None`` for an endless stream.
        seed: seed of item 0 (map-style) or first seed of the stream.
        num_inference_steps: denoising steps per stage.
        scheduler: a sampler of :data:`duodiff.schedulers.SAMPLERS` (``"ddim"``, ``"dpmsolver++"``, ...).
        dtype: autocast dtype for generation: ``"auto"`` (default; the fastest dtype within tolerance of float32,
            :mod:`duodiff.precision`), ``None``/``"float32"``, ``"bfloat16"``, ``"float16"``. ``"auto"`` is resolved
            once, here, with ``num_threads`` threads, so every worker and the cache use the same dtype; the
            resolved name is in ``generation["dtype"]``.
        conditioning_scale: ControlNet residual multiplier.
        transform: callable applied to every item dict (MONAI dict transforms, a ``Compose``, ...).
        cache_dir: map-style only: keep generated pairs as safetensors files in
            ``cache_dir/<model fingerprint>/`` and read them back on later requests. Writes are atomic,
            so several workers or processes can share one folder. The fingerprint covers the model's
            config and weights and the generation settings; do not change the weights while caching.
        pool_size: streaming only: number of ready pairs kept in memory (at most
            ``pool_size + generation_batch_size`` pairs exist at once).
        sample_kwargs: extra ``DuoDiffusion.sample`` options applied to every generation call: any of
            ``class_volumes``, ``guidance_scale``, ``volume_tolerance``, ``qc``, ``qc_threshold``, ``max_retries``,
            ``decode_tile_size`` (see :doc:`control`). With ``qc`` or ``volume_tolerance`` an item's ``"seed"`` is
            the seed that produced the accepted pair.
        generation_batch_size: streaming only: pairs per generation call. Values of streamed pairs are
            reproducible for a fixed batch size; with ``1`` they equal the map-style items bit for bit.
        rank: streaming only: this process's DDP rank (default: from ``torch.distributed``).
        world_size: streaming only: number of DDP processes (pass together with ``rank``).
        num_threads: intra-op threads used to generate on the CPU (default 1, what every DataLoader worker
            uses). CPU convolutions sum in an order that depends on the thread count, so a pinned count is what
            makes item ``i`` bit-identical in the main process, in forked, spawned or persistent workers and
            from the cache; it equals ``pipe.sample(1, seed=seed + i)`` run with ``torch.set_num_threads(
            num_threads)``. ``None`` uses the calling thread's count (faster in a main process with idle
            cores; items then match only where the thread counts match). Ignored on CUDA.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> SyntheticPairDataset:
        if cls is SyntheticPairDataset:
            num_samples = kwargs.get("num_samples", args[1] if len(args) > 1 else _UNSET)
            if num_samples is None:
                cls = StreamingSyntheticPairDataset
        return super().__new__(cls)

    def __init__(
        self,
        pipe: DuoDiffusion,
        num_samples: int | None,
        *,
        seed: int = 0,
        num_inference_steps: int = 50,
        scheduler: str = "ddim",
        dtype: str | torch.dtype | None = "auto",
        conditioning_scale: float = 1.0,
        transform: Callable[[dict[str, Any]], Any] | None = None,
        cache_dir: str | os.PathLike | None = None,
        pool_size: int = 16,
        generation_batch_size: int = 4,
        rank: int | None = None,
        world_size: int | None = None,
        sample_kwargs: dict[str, Any] | None = None,
        num_threads: int | None = GENERATION_THREADS,
    ) -> None:
        from ..pipeline import DuoDiffusion
        from ..precision import choose_dtype, is_auto
        from ..schedulers import check_num_inference_steps, check_scheduler_name

        if not isinstance(pipe, DuoDiffusion):
            raise TypeError(
                f"pipe must be a DuoDiffusion model, got {type(pipe).__name__}. Load one with "
                "DuoDiffusion.from_pretrained(...), or read saved pairs with SyntheticPairDataset.from_folder(dir)."
            )
        streaming = num_samples is None
        if not streaming and (isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1):
            raise ValueError(
                f"num_samples must be a positive int (map-style) or None (endless stream), got {num_samples!r}."
            )
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}.")
        check_num_inference_steps(num_inference_steps, pipe.config.scheduler)
        check_scheduler_name(scheduler)
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable (e.g. a monai.transforms.Compose), got {transform!r}.")
        for name, value in (("pool_size", pool_size), ("generation_batch_size", generation_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        if streaming and cache_dir is not None:
            raise ValueError(
                "cache_dir works with map-style datasets only (num_samples=N); a stream makes fresh pairs forever. "
                "Pass num_samples=N to cache, or drop cache_dir."
            )
        _check_rank(rank, world_size)
        if not streaming and rank is not None:
            raise ValueError(
                "rank/world_size shard streaming datasets only. A map-style dataset is sharded by its sampler: "
                "use torch.utils.data.DistributedSampler or duodiff.MixedBatchSampler(rank=..., num_replicas=...)."
            )
        check_num_threads(num_threads)
        if is_auto(dtype):  # once, here: workers and the cache fingerprint must all see the same dtype
            with intra_op_threads(num_threads, pipe.device):
                dtype = str(choose_dtype(pipe, num_inference_steps)).removeprefix("torch.")
        self.pipe = pipe
        self.num_samples = num_samples
        self.seed = int(seed)
        self.generation = {
            "num_inference_steps": int(num_inference_steps),
            "scheduler": str(scheduler),
            "dtype": None if dtype is None else str(dtype),
            "conditioning_scale": float(conditioning_scale),
        }
        allowed = {"class_volumes", "guidance_scale", "volume_tolerance", "qc", "qc_threshold", "max_retries",
                   "decode_tile_size"}
        unknown = sorted(set(sample_kwargs or {}) - allowed)
        if unknown:
            raise ValueError(f"sample_kwargs has unknown option(s) {unknown}; allowed: {sorted(allowed)}.")
        self.sample_kwargs = dict(sample_kwargs or {})
        volumes = self.sample_kwargs.get("class_volumes")
        if volumes is not None:  # refuse impossible volumes here, not later inside a DataLoader worker
            pipe.check_class_volumes(volumes, len(volumes) if isinstance(volumes, (list, tuple)) else 1)
        if self.sample_kwargs:  # part of the cache fingerprint (a qc module by its class and threshold)
            self.generation["sample_kwargs"] = repr(sorted(
                (k, type(v).__name__ if k == "qc" else v) for k, v in self.sample_kwargs.items()
            ))
        self._dtype = dtype
        self.transform = transform
        self.num_threads = num_threads
        self.pool_size = pool_size
        self.generation_batch_size = generation_batch_size
        self.rank, self.world_size = rank, world_size
        self._rank_at_init = _resolve_rank(None, None, None) if rank is None else None
        self._epoch = 0
        self._cases: list[Case] | None = None
        self.folder: Path | None = None
        self.cache_dir: Path | None = None
        if cache_dir is not None:
            self.cache_dir = Path(cache_dir) / model_fingerprint(pipe, self.generation)
            self.cache_dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ reading saved pairs
    @classmethod
    def from_folder(
        cls, folder: str | os.PathLike, *, transform: Callable[[dict[str, Any]], Any] | None = None
    ) -> SyntheticPairDataset:
        """A map-style dataset over pairs written by ``duodiff sample`` / :meth:`DuoSample.save`.

        Reads ``folder/imagesTr/<name>_0000.nii.gz`` (one file per channel) and ``folder/labelsTr/<name>.nii.gz``,
        or any MSD / nnU-Net v2 folder, sorted by name. Items have the same keys as generated ones; ``"seed"`` is
        parsed from names ending in ``_s<seed>`` (``-1`` when a name has no seed). Cases are listed and read by
        :mod:`duodiff.data.folders`, as ``duodiff train`` reads them (reoriented to RAS; the item's affine is the
        reoriented one).

        Raises:
            FileNotFoundError: ``folder`` has no ``imagesTr``/``labelsTr`` pairs, or a label or image is unpaired.
            BadCaseError: (when an item is read) image and label on different grids, non-integer labels, NaN.
        """
        from .folders import find_cases

        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable (e.g. a monai.transforms.Compose), got {transform!r}.")
        cases = find_cases(folder)
        self = super().__new__(cls)
        self.pipe = None
        self.num_samples = len(cases)
        self.seed = 0
        self.generation = {}
        self.sample_kwargs = {}
        self.num_threads = None
        self._dtype = None
        self.transform = transform
        self.pool_size = self.generation_batch_size = 1
        self.rank = self.world_size = None
        self._rank_at_init = None
        self._epoch = 0
        self._cases = cases
        self.folder = Path(folder)
        self.cache_dir = None
        return self

    # ------------------------------------------------------------------ map-style access
    def __len__(self) -> int:
        return int(self.num_samples)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        if self.folder is not None:
            return f"SyntheticPairDataset(folder={str(self.folder)!r}, num_samples={self.num_samples})"
        return (
            f"{type(self).__name__}(num_samples={self.num_samples}, seed={self.seed}, "
            f"volume_shape={tuple(self.pipe.config.volume_shape)}, device={self.pipe.device}, "
            f"{', '.join(f'{k}={v!r}' for k, v in self.generation.items())}"
            + (f", cache_dir={str(self.cache_dir)!r}" if self.cache_dir is not None else "")
            + ")"
        )

    def seed_of(self, index: int) -> int:
        """The seed of item ``index`` (``seed + index``)."""
        return self.seed + self._check_index(index)

    def _check_index(self, index: int) -> int:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer, torch.Tensor)):
            raise TypeError(f"index must be an int, got {type(index).__name__}.")
        i = int(index)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {int(index)} is out of range for a dataset of {n} pairs.")
        return i

    def __getitem__(self, index: int) -> Any:
        i = self._check_index(index)
        if self._cases is not None:
            item = self._read_case(self._cases[i])
        else:
            item = self._cached_or_generated(self.seed + i)
        return self.transform(item) if self.transform is not None else item

    def _read_case(self, case: Case) -> dict[str, Any]:
        from .folders import read_case

        pair = read_case(case)  # the shared checks: same grid, integer labels (never truncated), no NaN
        match = _SEED_IN_NAME.search(case.name)
        return _as_item(torch.from_numpy(pair.image), torch.from_numpy(pair.label), pair.affine,
                        int(match.group(1)) if match else -1)

    # ------------------------------------------------------------------ generation + cache
    def _generate(self, seeds: Sequence[int]) -> list[dict[str, Any]]:
        """Generate the pairs of ``seeds`` in one call (no transform applied)."""
        _check_device_usable(self.pipe)
        g = self.generation
        with intra_op_threads(self.num_threads, self.pipe.device):
            out = self.pipe.sample(len(seeds), seed=list(seeds), num_inference_steps=g["num_inference_steps"],
                                   scheduler=g["scheduler"], dtype=self._dtype,
                                   conditioning_scale=g["conditioning_scale"], progress=False,
                                   **self.sample_kwargs)
        return [_as_item(out.images[i], out.labels[i], out.affine, s) for i, s in enumerate(out.seeds)]

    def cache_path(self, seed: int) -> Path:
        """The cache file of the pair made from ``seed`` (needs ``cache_dir``)."""
        from ..output import sample_name

        if self.cache_dir is None:
            raise ValueError("This dataset has no cache_dir.")
        return self.cache_dir / f"{sample_name(seed)}.safetensors"

    def _cached_or_generated(self, seed: int) -> dict[str, Any]:
        if self.cache_dir is None:
            return self._generate([seed])[0]
        path = self.cache_path(seed)
        if path.exists():
            return self._read_cache(path, seed)
        item = self._generate([seed])[0]
        self._write_cache(path, item, seed)
        return item

    def _write_cache(self, path: Path, item: dict[str, Any], requested_seed: int) -> None:
        from safetensors.torch import save_file

        from ..io import atomic_write

        num_classes = self.pipe.config.num_classes
        label_dtype = torch.uint8 if num_classes <= 256 else torch.int32
        tensors = {
            keys.IMAGE: item[keys.IMAGE].as_tensor().contiguous(),
            keys.LABEL: item[keys.LABEL].as_tensor().to(label_dtype).contiguous(),
            "affine": item[keys.IMAGE].affine.to(torch.float64).contiguous(),
        }
        # "requested_seed" keys the file; "seed" is the seed that made the pair (a retry seed with qc)
        meta = {"format": _CACHE_FORMAT, "requested_seed": str(requested_seed), keys.SEED: str(item[keys.SEED])}
        with atomic_write(path, suffix=".safetensors") as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    @staticmethod
    def _read_cache(path: Path, seed: int) -> dict[str, Any]:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"Cache file {str(path)!r} is unreadable ({e}); delete it to regenerate the pair.") from e
        if meta.get("format") != _CACHE_FORMAT or meta.get("requested_seed") != str(seed) or set(tensors) != {
            keys.IMAGE, keys.LABEL, "affine"
        }:
            raise ValueError(
                f"Cache file {str(path)!r} is not a duodiff pair for seed {seed} (metadata {meta}); delete it to "
                "regenerate the pair."
            )
        return _as_item(tensors[keys.IMAGE], tensors[keys.LABEL].long(), tensors["affine"].numpy(),
                        int(meta.get(keys.SEED, seed)))

    # ------------------------------------------------------------------ epochs
    def set_epoch(self, epoch: int) -> None:
        """Streaming: make the next iteration use fresh seeds (``seed + epoch * 2**32 + ...``).

        Map-style datasets do not depend on the epoch (item ``i`` is always seed ``seed + i``); the call
        is accepted so training loops can call it on any dataset.
        """
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}.")
        self._epoch = epoch


#: (stop event, thread) of every running generation pool; stopped and joined at interpreter exit so a
#: thread still inside a torch op cannot abort the process ("terminate called without an active exception").
_LIVE_POOLS: set[tuple[threading.Event, threading.Thread]] = set()
_JOIN_TIMEOUT_S = 300.0


def _stop_pool(stop: threading.Event, thread: threading.Thread) -> None:
    """Stop a pool thread and wait for its current generation call to finish."""
    stop.set()
    if thread is not threading.current_thread():
        thread.join(_JOIN_TIMEOUT_S)
    _LIVE_POOLS.discard((stop, thread))


@atexit.register
def _stop_all_pools() -> None:
    for stop, _ in list(_LIVE_POOLS):
        stop.set()
    for stop, thread in list(_LIVE_POOLS):
        _stop_pool(stop, thread)


class _Failure:
    """Carries an exception from the generation thread to the consumer."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class StreamingSyntheticPairDataset(SyntheticPairDataset, IterableDataset):
    """The endless form of :class:`SyntheticPairDataset` (``num_samples=None``).

    Iterating starts a daemon thread that generates ``generation_batch_size`` pairs at a time on the
    model's device (its own CUDA stream on GPUs) and keeps up to ``pool_size`` of them ready; the
    consumer takes pairs in seed order and only waits when the pool is empty. Closing (or dropping)
    the iterator stops the thread after its current generation call, and waits for that call; so does
    interpreter exit. Errors in the thread are re-raised in the consumer.

    With DataLoader workers each worker runs its own thread over its own seed stream. On CUDA prefer
    ``num_workers=0``: the thread already overlaps generation with training.
    """

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

    # The epoch lives in a shared-memory tensor: DataLoader workers, forked or spawned, hold this very
    # memory (torch hands shared tensors to workers by handle), so persistent workers read the epoch the
    # main process set with set_epoch() when they start their next iteration.
    @property
    def _epoch(self) -> int:
        return int(self._shared_epoch.item())

    @_epoch.setter
    def _epoch(self, epoch: int) -> None:
        if "_shared_epoch" not in self.__dict__:
            self._shared_epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._shared_epoch.fill_(int(epoch))

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration use fresh seeds (``seed + epoch * 2**32 + ...``), in DataLoader workers too.

        The epoch is kept in shared memory, so workers started before the call (``persistent_workers=True``)
        use it from their next iteration on. Call it before ``iter(loader)``; an iteration already running
        keeps its seeds. Without it, a new iteration replays the same sequence.
        """
        super().set_epoch(epoch)

    def seed_stream(self) -> Iterator[int]:
        """The seeds this process (rank + DataLoader worker) yields, in order (endless)."""
        rank, world = _resolve_rank(self.rank, self.world_size, self._rank_at_init)
        k, streams = stream_position(rank, world)
        base = self.seed + self._epoch * EPOCH_SEED_STRIDE + k
        return (base + m * streams for m in itertools.count())

    def __iter__(self) -> Iterator[Any]:
        _check_device_usable(self.pipe)
        seeds = self.seed_stream()
        pool: queue.Queue = queue.Queue(maxsize=self.pool_size)
        stop = threading.Event()
        thread = threading.Thread(target=self._produce, args=(seeds, pool, stop), daemon=True,
                                  name="duodiff-synthetic-pool")
        _LIVE_POOLS.add((stop, thread))
        thread.start()
        try:
            while True:
                try:
                    item = pool.get(timeout=1.0)
                except queue.Empty:
                    if not thread.is_alive():
                        raise RuntimeError("The synthetic generation thread stopped without an error.") from None
                    continue
                if isinstance(item, _Failure):
                    raise RuntimeError(
                        f"Generating synthetic pairs failed in the background thread: {item.exc!r}"
                    ) from item.exc
                yield item
        finally:
            _stop_pool(stop, thread)

    def _produce(self, seeds: Iterator[int], pool: queue.Queue, stop: threading.Event) -> None:
        def put(obj: Any) -> bool:
            while not stop.is_set():
                try:
                    pool.put(obj, timeout=0.2)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            device = self.pipe.device
            stream = torch.cuda.Stream(device) if device.type == "cuda" else None
            ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
            with ctx:
                while not stop.is_set():
                    chunk = list(itertools.islice(seeds, self.generation_batch_size))
                    for item in self._generate(chunk):
                        if self.transform is not None:
                            item = self.transform(item)
                        if not put(item):
                            return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises
            put(_Failure(e))

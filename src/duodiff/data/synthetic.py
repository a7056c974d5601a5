"""`SyntheticPairDataset`: synthetic (image, label) pairs as a map-style PyTorch dataset.

Item ``i`` is the pair made from seed ``seed + i``, generated on demand (optionally cached on disk). The same
``i`` gives the same pair in every run, every DataLoader worker and from the cache. The other two forms are
their own classes: :class:`~duodiff.data.StreamingSyntheticPairDataset` (endless, generated in a background
pool; also what ``SyntheticPairDataset(pipe, num_samples=None)`` builds) and
:class:`~duodiff.data.PairFolderDataset` (pairs saved by ``duodiff sample``; :meth:`SyntheticPairDataset.from_folder`).
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset

from .. import keys
from ..schedulers import DEFAULT_NUM_INFERENCE_STEPS, DEFAULT_SCHEDULER
from ..threads import GENERATION_THREADS
from .generation import GeneratorBacked, PairGenerator, as_item, check_index, check_seed, check_transform
from .pair_folder import PairFolderDataset
from .streaming import EPOCH_SEED_STRIDE, StreamingSyntheticPairDataset, stream_position

if TYPE_CHECKING:  # pragma: no cover
    from ..pipeline import DuoDiffusion

__all__ = ["SyntheticPairDataset", "StreamingSyntheticPairDataset", "stream_position", "EPOCH_SEED_STRIDE"]

_CACHE_FORMAT = "duodiff-pair-v1"
_UNSET = object()
_STREAM_ONLY = ("rank", "world_size", "pool_size", "generation_batch_size")


def _stream(pipe: DuoDiffusion, num_samples: None = None, *, cache_dir: Any = None,
            **options: Any) -> StreamingSyntheticPairDataset:
    """``SyntheticPairDataset(pipe, num_samples=None, **options)``: the stream with the same options."""
    if cache_dir is not None:
        raise ValueError(
            "cache_dir works with map-style datasets only (num_samples=N); a stream makes fresh pairs forever. "
            "Pass num_samples=N to cache, or drop cache_dir."
        )
    return StreamingSyntheticPairDataset(pipe, **options)


class SyntheticPairDataset(GeneratorBacked, Dataset, metaclass=abc.ABCMeta):
    """Synthetic (image, label) pairs from a :class:`~duodiff.DuoDiffusion` model, as a map-style dataset.

    Why: a fixed, reproducible synthetic set that any sampler can index (``DistributedSampler``,
    :class:`~duodiff.MixedBatchSampler` over ``ConcatDataset([real, synthetic])``) and that a cache can keep.
    Item ``i`` is made from seed ``seed + i``.

    Items are dicts ``{"image": MetaTensor (C, H, W, D) float32 in [0, 1], "label": MetaTensor (1, H, W, D)
    int64, "is_synthetic": True, "seed": int}`` with the model's affine, passed through ``transform``
    when one is given.

    ``num_samples=None`` builds a :class:`~duodiff.data.StreamingSyntheticPairDataset` instead (endless, an
    ``IterableDataset``; it takes ``pool_size``, ``generation_batch_size``, ``rank`` and ``world_size``), and
    :meth:`from_folder` a :class:`~duodiff.data.PairFolderDataset`. Both count as ``SyntheticPairDataset`` in
    ``isinstance`` checks. A map-style dataset is sharded by its sampler, not by ``rank``.

    Example:
        >>> from duodiff.testing import tiny_pipeline
        >>> ds = SyntheticPairDataset(tiny_pipeline(), num_samples=8, num_inference_steps=2)
        >>> item = ds[3]
        >>> tuple(item["image"].shape), item["seed"], item["is_synthetic"]
        ((1, 16, 16, 16), 3, True)

    Args:
        pipe: the model. Generation runs on ``pipe.device``.
        num_samples: number of pairs (``None``: an endless stream, see above).
        seed: seed of item 0.
        num_inference_steps: denoising steps per stage.
        scheduler: a sampler of :data:`duodiff.schedulers.SAMPLERS` (``"ddim"``, ``"dpmsolver++"``, ...), or
            ``None`` (default): each stage's own, DDIM or ``rflow`` for a stage trained with rectified flow.
        dtype: autocast dtype for generation: ``"auto"`` (default; the fastest dtype within tolerance of float32,
            :mod:`duodiff.precision`), ``None``/``"float32"``, ``"bfloat16"``, ``"float16"``. ``"auto"`` is resolved
            once, here, with ``num_threads`` threads, so every worker and the cache use the same dtype; the
            resolved name is in ``generation["dtype"]``.
        conditioning_scale: ControlNet residual multiplier.
        transform: callable applied to every item dict (MONAI dict transforms, a ``Compose``, ...).
        cache_dir: keep generated pairs as safetensors files in ``cache_dir/<model fingerprint>/`` and read
            them back on later requests. Writes are atomic, so several workers or processes can share one
            folder. The fingerprint covers the model's config and weights and the generation settings; do not
            change the weights while caching.
        sample_kwargs: extra ``DuoDiffusion.sample`` options applied to every generation call: any of
            ``class_volumes``, ``guidance_scale``, ``volume_tolerance``, ``qc``, ``qc_threshold``, ``max_retries``,
            ``decode_tile_size`` (see :doc:`control`). With ``qc`` or ``volume_tolerance`` an item's ``"seed"`` is
            the seed that produced the accepted pair.
        num_threads: intra-op threads used to generate on the CPU (default 1, what every DataLoader worker
            uses). CPU convolutions sum in an order that depends on the thread count, so a pinned count is what
            makes item ``i`` bit-identical in the main process, in forked, spawned or persistent workers and
            from the cache; it equals ``pipe.sample(1, seed=seed + i)`` run with ``torch.set_num_threads(
            num_threads)``. ``None`` uses the calling thread's count (faster in a main process with idle
            cores; items then match only where the thread counts match). Ignored on CUDA.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        # Only the one-class spelling of the stream: SyntheticPairDataset(pipe, num_samples=None, ...) returns
        # StreamingSyntheticPairDataset(pipe, ...), built by its own constructor (it is no subclass, so Python
        # does not call __init__ again). Every other call builds this class normally.
        num_samples = kwargs.get("num_samples", args[1] if len(args) > 1 else _UNSET)
        if cls is SyntheticPairDataset and num_samples is None:
            return _stream(*args, **kwargs)
        given = [name for name in _STREAM_ONLY if kwargs.get(name) is not None]
        if given:
            raise ValueError(
                f"{'/'.join(given)} apply to streaming datasets only (num_samples=None). A map-style dataset is "
                "sharded by its sampler: use torch.utils.data.DistributedSampler or "
                "duodiff.MixedBatchSampler(rank=..., num_replicas=...)."
            )
        return super().__new__(cls)

    def __init__(
        self,
        pipe: DuoDiffusion,
        num_samples: int,
        *,
        seed: int = 0,
        num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
        scheduler: str | None = DEFAULT_SCHEDULER,
        dtype: str | torch.dtype | None = "auto",
        conditioning_scale: float = 1.0,
        transform: Callable[[dict[str, Any]], Any] | None = None,
        cache_dir: str | os.PathLike | None = None,
        sample_kwargs: dict[str, Any] | None = None,
        num_threads: int | None = GENERATION_THREADS,
    ) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(
                f"num_samples must be a positive int (map-style) or None (endless stream), got {num_samples!r}."
            )
        seed = check_seed(seed)
        check_transform(transform)
        self.generator = PairGenerator(pipe, num_inference_steps=num_inference_steps, scheduler=scheduler,
                                       dtype=dtype, conditioning_scale=conditioning_scale,
                                       sample_kwargs=sample_kwargs, num_threads=num_threads)
        self.num_samples = num_samples
        self.seed = seed
        self.transform = transform
        self.cache_dir: Path | None = None
        if cache_dir is not None:
            self.cache_dir = Path(cache_dir) / self.generator.fingerprint()
            self.cache_dir.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_folder(
        cls, folder: str | os.PathLike, *, transform: Callable[[dict[str, Any]], Any] | None = None
    ) -> PairFolderDataset:
        """A map-style dataset over pairs written by ``duodiff sample`` / :meth:`DuoSample.save`.

        The same as ``PairFolderDataset(folder, transform=transform)``; see :class:`~duodiff.data.PairFolderDataset`
        (``"seed"`` is parsed from names ending in ``_s<seed>``, ``-1`` when a name has none).

        Raises:
            FileNotFoundError: ``folder`` has no ``imagesTr``/``labelsTr`` pairs, or a label or image is unpaired.
            BadCaseError: (when an item is read) image and label on different grids, non-integer labels, NaN.
        """
        return PairFolderDataset(folder, transform=transform)

    # ------------------------------------------------------------------ map-style access
    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self) -> str:
        cache = f", cache_dir={str(self.cache_dir)!r}" if self.cache_dir is not None else ""
        return f"{type(self).__name__}(num_samples={self.num_samples}, seed={self.seed}, {self._describe()}{cache})"

    def seed_of(self, index: int) -> int:
        """The seed of item ``index`` (``seed + index``)."""
        return self.seed + check_index(index, len(self))

    def __getitem__(self, index: int) -> Any:
        item = self._cached_or_generated(self.seed_of(index))
        return self.transform(item) if self.transform is not None else item

    def set_epoch(self, epoch: int) -> None:
        """Accepted so training loops can call it on any dataset; item ``i`` is always seed ``seed + i``."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}.")

    # ------------------------------------------------------------------ generation + cache
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

        label_dtype = torch.uint8 if self.pipe.config.num_classes <= 256 else torch.int32
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
        return as_item(tensors[keys.IMAGE], tensors[keys.LABEL].long(), tensors["affine"].numpy(),
                       int(meta.get(keys.SEED, seed)))


# The other two forms count as SyntheticPairDataset in isinstance checks (as before the split), without
# inheriting the map-style methods.
SyntheticPairDataset.register(StreamingSyntheticPairDataset)
SyntheticPairDataset.register(PairFolderDataset)

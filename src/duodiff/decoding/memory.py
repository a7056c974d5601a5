"""The decoder's memory: measured peak tensor bytes, a linear memory model per decoder, free device memory.

:func:`estimate_decode_bytes` fits ``bytes = a + b * latent_voxels`` from two small probe decodes measured with
:func:`peak_tensor_bytes`; the planner (:mod:`duodiff.decoding.planning`) sizes sub-batches and tiles with it.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["peak_tensor_bytes", "estimate_decode_bytes", "available_memory", "CUDA_MEMORY_FRACTION"]

#: Share of free CUDA memory :func:`available_memory` offers a decode (the rest: cuDNN workspaces, fragmentation).
CUDA_MEMORY_FRACTION = 0.7

#: autoencoder -> {(device, dtype, autocast state): (intercept, bytes per latent voxel)}
_PROBE_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple, tuple[float, float]]] = weakref.WeakKeyDictionary()


class _TensorMemoryTracker(TorchDispatchMode):
    """Counts bytes of live tensor storages created by aten ops (any device); records the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: dict[int, weakref.finalize] = {}

    def _release(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._storages.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key, nbytes = st.data_ptr(), st.nbytes()
            if nbytes == 0 or key in self._storages:
                continue
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            self._storages[key] = weakref.finalize(st, self._release, key, nbytes)
        return out


def peak_tensor_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of tensors allocated while ``fn()`` runs and still alive at that moment.

    Device-independent (it watches every aten op through a ``TorchDispatchMode``); it counts
    tensor storages only, not allocator caches or cuDNN/oneDNN workspaces. Inputs and parameters
    that exist before the call are not counted. The result of ``fn`` is discarded.
    """
    tracker = _TensorMemoryTracker()
    with tracker:
        out = fn()
    del out
    return tracker.peak


def _autocast_key(device_type: str) -> tuple:
    try:
        enabled = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if enabled else None
    except (TypeError, RuntimeError):  # device types without autocast support
        enabled, dtype = False, None
    return enabled, dtype


def _decode_fn(autoencoder: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(z: torch.Tensor) -> torch.Tensor:
        return autoencoder.decode(z).float()

    return fn


@dataclass(frozen=True)
class _DecoderProfile:
    """Linear memory model of one decoder: ``peak = intercept + slope * latent_voxels`` (bytes)."""

    intercept: float
    slope: float
    upsample: int
    out_channels: int


def _profile(autoencoder: nn.Module) -> _DecoderProfile:
    """Measure (once per autoencoder, device, dtype and autocast state) the decoder's memory model."""
    param = next(autoencoder.parameters())
    device = param.device
    channels = _latent_channels(autoencoder)
    cache = _PROBE_CACHE.setdefault(autoencoder, {})
    key = (device, param.dtype, _autocast_key(device.type))
    if key not in cache:
        fn = _decode_fn(autoencoder)
        sizes = (4, 8)
        peaks, out_shape = [], None
        with torch.inference_mode():
            for s in sizes:
                z = torch.zeros(1, channels, s, s, s, device=device, dtype=param.dtype)
                out_shape = tuple(fn(z).shape)
                peaks.append(peak_tensor_bytes(lambda z=z: fn(z)))
        v0, v1 = sizes[0] ** 3, sizes[1] ** 3
        slope = max((peaks[1] - peaks[0]) / (v1 - v0), 0.0)
        cache[key] = _DecoderProfile(
            intercept=max(peaks[0] - slope * v0, 0.0), slope=slope, upsample=out_shape[2] // sizes[1],
            out_channels=out_shape[1],
        )
    return cache[key]


def estimate_decode_bytes(autoencoder: nn.Module, latent_shape: Sequence[int]) -> int:
    """Peak tensor memory (bytes) of ``autoencoder.decode`` for ONE latent of spatial shape ``(h, w, d)``.

    Measured, not guessed: two small probe decodes (on the autoencoder's device, under the current
    autocast state) give ``bytes = a + b * voxels``; the fit is cached per autoencoder, device and
    autocast dtype. Peak memory of a convolutional decoder grows linearly with volume; a decoder
    with non-local attention grows faster, so the estimate is optimistic there.

    Args:
        autoencoder: a MONAI ``AutoencoderKL`` (anything with ``.decode`` and parameters).
        latent_shape: spatial latent shape ``(h, w, d)``.
    """
    prof = _profile(autoencoder)
    return int(math.ceil(prof.intercept + prof.slope * math.prod(int(s) for s in latent_shape)))


def _output_bytes(autoencoder: nn.Module, latent_shape: Sequence[int], n: int = 1) -> int:
    """Bytes of ``n`` float32 decoded volumes."""
    prof = _profile(autoencoder)
    return 4 * n * prof.out_channels * math.prod(int(s) * prof.upsample for s in latent_shape)


def available_memory(device: torch.device) -> int | None:
    """Bytes a decode may plan to use on ``device``: ``CUDA_MEMORY_FRACTION`` of free CUDA memory
    (plus what PyTorch's cache holds unused); ``None`` (no limit) on other devices."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    cached_unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(CUDA_MEMORY_FRACTION * (free + cached_unused))


def _latent_channels(autoencoder: nn.Module) -> int:
    channels = getattr(autoencoder, "latent_channels", None)
    if channels is None:
        raise TypeError(
            f"autoencoder must be a MONAI AutoencoderKL (with .latent_channels and .decode), "
            f"got {type(autoencoder).__name__}."
        )
    return int(channels)

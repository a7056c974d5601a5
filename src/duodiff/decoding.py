"""Memory-bounded VAE decoding: whole, in sub-batches, or in overlapping tiles.

Peak memory of latent diffusion sampling is in the autoencoder's decoder: its last level holds
``channels[0]`` feature maps at full image resolution.

The default, ``tile_size="auto"``, never looks at free memory: it decodes whole volumes, one per
decoder call, so the same latents give the same output whatever else runs on the device. If one
volume does not fit, it raises :class:`DecodeMemoryError` (a ``MemoryError``) that suggests tiles;
tiling is never switched on behind your back. With an explicit byte budget (``max_memory=``, e.g.
``max_memory=available_memory(device)``) :func:`decode` plans within it, preferring exact strategies:

1. the whole batch at once, if it fits;
2. sub-batches of whole volumes (exact: the decoder treats samples independently);
3. overlapping latent tiles blended with Gaussian weights by MONAI's
   :class:`~monai.inferers.SlidingWindowInferer`, only when one volume does not fit.

Each tile is decoded with ``halo`` extra latent voxels of context on every side (cropped away
afterwards, via the inferer's ``with_coord`` hook), so tile borders do not see zero padding where
the volume continues. Tiling is still approximate: the decoder's receptive field can exceed the
halo, and each tile's ``GroupNorm`` layers see that tile's statistics instead of the whole
volume's. :func:`seam_report` measures the tiled-vs-whole difference on your own model;
``docs/performance.md`` lists the tolerances measured for the presets.

Example:
    >>> import torch
    >>> from duodiff.decoding import decode
    >>> from duodiff.testing import tiny_pipeline
    >>> ae = tiny_pipeline().image_autoencoder
    >>> z = torch.randn(1, 3, 8, 8, 8)
    >>> tuple(decode(ae, z, tile_size=(6, 6, 6)).shape)
    (1, 1, 16, 16, 16)
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = [
    "TileSize",
    "check_tile_size",
    "parse_tile_size",
    "decode",
    "resolve_tile_size",
    "DecodePlan",
    "DecodeMemoryError",
    "describe_decode",
    "estimate_decode_bytes",
    "available_memory",
    "peak_tensor_bytes",
    "SeamReport",
    "seam_report",
    "DEFAULT_OVERLAP",
    "DEFAULT_HALO",
    "CUDA_MEMORY_FRACTION",
]

logger = logging.getLogger(__name__)

#: ``None`` (whole batch in one call), ``"auto"`` (whole volumes one by one, or planned within an explicit
#: ``max_memory``), an int (cubic tile) or ``(h, w, d)``; sizes are in latent voxels.
TileSize = int | Sequence[int] | Literal["auto"] | None

#: Fraction of each tile side shared with its neighbour (blended with Gaussian weights).
DEFAULT_OVERLAP = 0.25
#: Latent voxels of context decoded around each tile and cropped away.
DEFAULT_HALO = 4
#: Share of free CUDA memory :func:`available_memory` offers a decode (the rest: cuDNN workspaces, fragmentation).
CUDA_MEMORY_FRACTION = 0.7
#: Smallest tile side (latent voxels) ``"auto"`` will choose; smaller tiles are mostly border.
MIN_TILE_SIDE = 4

#: autoencoder -> {(device, dtype, autocast state): (intercept, bytes per latent voxel)}
_PROBE_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple, tuple[float, float]]] = weakref.WeakKeyDictionary()


# ---------------------------------------------------------------------------------------------- memory
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


# ---------------------------------------------------------------------------------------------- planning
def _check_latents(latents: torch.Tensor) -> None:
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents must be a torch.Tensor, got {type(latents).__name__}.")
    if latents.ndim != 5:
        raise ValueError(f"latents must have shape (N, C, h, w, d), got {tuple(latents.shape)}.")


def check_tile_size(tile_size: TileSize) -> None:
    """Raise ``ValueError`` unless ``tile_size`` is ``None``, ``"auto"``, a positive int or three positive ints."""
    if tile_size is None or tile_size == "auto":
        return
    if isinstance(tile_size, str):
        raise ValueError(f"decode_tile_size must be None, 'auto', an int or (h, w, d), got {tile_size!r}.")
    _as_tile(tile_size, (1, 1, 1))


def parse_tile_size(text: str) -> TileSize:
    """Command-line form: ``"auto"``, ``"none"``, ``"24"`` or ``"24,24,16"`` (latent voxels)."""
    t = text.strip().lower()
    if t in ("auto", "none"):
        return None if t == "none" else "auto"
    try:
        sides = [int(v) for v in t.split(",")]
    except ValueError:
        raise ValueError(
            f"decode tile size must be 'auto', 'none', an int or H,W,D (latent voxels), got {text!r}."
        ) from None
    tile: TileSize = sides[0] if len(sides) == 1 else tuple(sides)
    check_tile_size(tile)
    return tile


def _as_tile(tile_size: int | Sequence[int], latent_shape: Sequence[int]) -> tuple[int, int, int]:
    try:
        sides = [tile_size] * 3 if isinstance(tile_size, int) else list(tile_size)
    except TypeError:
        sides = []
    if len(sides) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sides):
        raise ValueError(
            f"decode_tile_size must be None, 'auto', a positive int or three positive ints (h, w, d) in latent "
            f"voxels, got {tile_size!r}."
        )
    return tuple(min(int(s), int(m)) for s, m in zip(sides, latent_shape))  # type: ignore[return-value]


def _tile_bytes(autoencoder: nn.Module, tile: Sequence[int]) -> int:
    """Decode of one tile plus MONAI's per-window blending temporaries (weight map, weighted copy)."""
    prof = _profile(autoencoder)
    full_voxels = math.prod(int(s) * prof.upsample for s in tile)
    return estimate_decode_bytes(autoencoder, tile) + 4 * full_voxels * (1 + 2 * prof.out_channels)


def _with_halo(tile: Sequence[int], latent_shape: Sequence[int], halo: int) -> list[int]:
    return [min(int(t) + 2 * halo, int(s)) for t, s in zip(tile, latent_shape)]


def _fit_tile(
    autoencoder: nn.Module, latent_shape: Sequence[int], budget: int, halo: int
) -> tuple[tuple[int, int, int], int]:
    """Largest tile (shrinking the longest side first) whose decode (with halo) and blending fit ``budget``.

    If no tile fits with ``halo``, the halo is halved until one does. Returns ``(tile, halo)``.
    """
    for h in sorted({halo, *(halo >> k for k in range(1, max(halo.bit_length(), 1) + 1))}, reverse=True):
        tile = [int(s) for s in latent_shape]
        while _tile_bytes(autoencoder, _with_halo(tile, latent_shape, h)) > budget:
            i = max(range(3), key=lambda k: tile[k])
            if tile[i] <= MIN_TILE_SIDE:
                break
            tile[i] = max(MIN_TILE_SIDE, int(tile[i] * 0.85))
        else:
            if h < halo:
                logger.warning("decode budget too small for a halo of %d latent voxels; using %d", halo, h)
            return tuple(tile), h  # type: ignore[return-value]
    small = [min(MIN_TILE_SIDE, s) for s in latent_shape]
    raise MemoryError(
        f"Cannot decode within {budget / 2**20:.1f} MiB: even a {MIN_TILE_SIDE}^3 latent tile needs about "
        f"{_tile_bytes(autoencoder, small) / 2**20:.1f} MiB besides the output. Free memory on the device, pass "
        "output_device='cpu', or decode on CPU."
    )


class DecodeMemoryError(MemoryError):
    """An exact (whole-volume) decode ran out of device memory; the message says how to decode in tiles."""


@dataclass(frozen=True)
class DecodePlan:
    """How :func:`decode` splits the work.

    Attributes:
        volumes_per_call: whole volumes decoded per decoder call (when ``tile`` is ``None``).
        tile: latent tile ``(h, w, d)``, or ``None`` for whole volumes.
        halo: context voxels decoded around each tile.
    """

    volumes_per_call: int
    tile: tuple[int, int, int] | None
    halo: int

    def describe(self, overlap: float = DEFAULT_OVERLAP) -> str:
        """``"whole"`` (exact) or ``"tiled HxWxD overlap=O halo=K"`` (approximate), as recorded in outputs."""
        if self.tile is None:
            return "whole"
        return f"tiled {'x'.join(map(str, self.tile))} overlap={overlap:g} halo={self.halo}"


def resolve_tile_size(
    autoencoder: nn.Module,
    latents_shape: Sequence[int],
    tile_size: TileSize = "auto",
    *,
    max_memory: int | None = None,
    halo: int = DEFAULT_HALO,
    output_on_device: bool = True,
) -> DecodePlan:
    """Plan a decode: volumes per call, or the latent tile and its halo.

    Args:
        autoencoder: the decoder's autoencoder (on its target device).
        latents_shape: ``(N, C, h, w, d)``.
        tile_size: ``None`` (whole batch), ``"auto"`` (whole volumes one per call; with ``max_memory``: fit
            that budget), an int or ``(h, w, d)``.
        max_memory: explicit byte budget for ``"auto"``. ``None`` (default): no budget, so the plan depends
            only on the model and the input shape, never on free memory.
        halo: context voxels decoded around each tile (counted in the tile's memory; ``"auto"``
            halves it when the budget is too small for any tile with it).
        output_on_device: whether the stitched float32 output lives on the decoder's device (and
            so counts against the budget).
    """
    n, spatial = int(latents_shape[0]), tuple(int(s) for s in latents_shape[2:])
    if tile_size is None:
        return DecodePlan(n, None, halo)
    if isinstance(tile_size, str):
        check_tile_size(tile_size)
        if max_memory is None:  # exact, and independent of what else runs on the device
            return DecodePlan(1, None, halo)
        budget = int(max_memory)
        per_volume = estimate_decode_bytes(autoencoder, spatial)
        if n * per_volume <= budget:
            return DecodePlan(n, None, halo)
        # volumes are decoded into a preallocated output; each call also holds its own output
        output = _output_bytes(autoencoder, spatial, n) if output_on_device else 0
        if per_volume <= budget - output:
            return DecodePlan(max(1, min(n, (budget - output) // max(per_volume, 1))), None, halo)
        # tiles are blended into the output plus a one-channel weight map
        stitch = _output_bytes(autoencoder, spatial, n) * (1 + 1 / _profile(autoencoder).out_channels)
        tile, h = _fit_tile(autoencoder, spatial, int(budget - (stitch if output_on_device else 0)), halo)
        return DecodePlan(1, tile, h)
    tile = _as_tile(tile_size, spatial)  # type: ignore[arg-type]
    return DecodePlan(n, None, halo) if tile == spatial else DecodePlan(1, tile, halo)


# ---------------------------------------------------------------------------------------------- decoding
def decode(
    autoencoder: nn.Module,
    latents: torch.Tensor,
    *,
    tile_size: TileSize = "auto",
    overlap: float = DEFAULT_OVERLAP,
    halo: int = DEFAULT_HALO,
    max_memory: int | None = None,
    output_device: str | torch.device | None = None,
) -> torch.Tensor:
    """Decode latents within a memory budget (see the module docstring for the strategy).

    Args:
        autoencoder: a MONAI ``AutoencoderKL``.
        latents: ``(N, C, h, w, d)`` latents already divided by the scale factor.
        tile_size: ``None``: whole batch in one call. ``"auto"``: whole volumes, one per call (exact; a
            device out-of-memory error becomes :class:`DecodeMemoryError`); with ``max_memory``: whole
            batch, sub-batches or tiles, whichever fits that budget. An int or
            ``(h, w, d)``: tiles of that many latent voxels (clipped to the latent shape; a tile
            covering the whole latent decodes whole volumes, exactly).
        overlap: fraction of a tile side shared with neighbours, in ``[0, 1)``.
        halo: latent voxels of context decoded on each side of a tile and cropped away (``>= 0``).
        max_memory: explicit byte budget for ``"auto"`` (default: none). Pass
            ``available_memory(device)`` to opt into planning from free memory; the output then depends on it.
        output_device: where tiles are stitched (default: the latents' device); ``"cpu"`` keeps the
            full-size output off the GPU.

    Returns:
        float32 ``(N, C_out, H, W, D)`` decoder output (logits or intensities, not clamped).
    """
    _check_latents(latents)
    if not isinstance(overlap, (int, float)) or isinstance(overlap, bool) or not 0 <= overlap < 1:
        raise ValueError(f"overlap must be a number in [0, 1), got {overlap!r}.")
    if isinstance(halo, bool) or not isinstance(halo, int) or halo < 0:
        raise ValueError(f"halo must be an int >= 0 (latent voxels), got {halo!r}.")
    on_device = output_device is None or torch.device(output_device) == latents.device
    plan = resolve_tile_size(
        autoencoder, latents.shape, tile_size, max_memory=max_memory, halo=halo, output_on_device=on_device
    )
    per_call, tile, halo = plan.volumes_per_call, plan.tile, plan.halo
    fn = _decode_fn(autoencoder)
    n = int(latents.shape[0])
    if tile is None and tile_size == "auto" and max_memory is None:
        return _decode_volumes(fn, latents, output_device)
    if tile is None:
        if per_call >= n:
            out = fn(latents)
            return out if output_device is None else out.to(output_device)
        logger.info("decoding %d volumes in sub-batches of %d to stay within memory", n, per_call)
        first = fn(latents[:per_call])
        out = torch.empty((n, *first.shape[1:]), dtype=first.dtype,
                          device=first.device if output_device is None else output_device)
        out[:per_call] = first
        del first
        for i in range(per_call, n, per_call):
            out[i : i + per_call] = fn(latents[i : i + per_call])
        return out
    from monai.inferers import SlidingWindowInferer

    logger.info("decoding %s latents in %s tiles (overlap %.2f, halo %d)", tuple(latents.shape[2:]), tile, overlap,
                halo)
    upsample = _profile(autoencoder).upsample
    spatial = latents.shape[2:]

    def decode_window(window: torch.Tensor, coords: list) -> torch.Tensor:
        # decode the window plus `halo` voxels of context from the full latent, keep the window's part
        outs = []
        for batch_slice, _, *win in coords:
            ext = [slice(max(0, w.start - halo), min(int(n), w.stop + halo)) for w, n in zip(win, spatial)]
            out = fn(latents[(batch_slice, slice(None), *ext)])
            crop = [slice((w.start - e.start) * upsample, (w.stop - e.start) * upsample) for w, e in zip(win, ext)]
            outs.append(out[(slice(None), slice(None), *crop)])
        return torch.cat(outs)

    inferer = SlidingWindowInferer(
        roi_size=tile, sw_batch_size=1, overlap=overlap, mode="gaussian", device=output_device, progress=False,
        with_coord=True,
    )
    return inferer(latents, decode_window).float()


def _decode_volumes(fn: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor,
                    output_device: str | torch.device | None) -> torch.Tensor:
    """The default decode: whole volumes, one per call; out-of-memory becomes :class:`DecodeMemoryError`."""
    if latents.shape[0] == 0:
        return fn(latents)
    outs = []
    for i in range(int(latents.shape[0])):
        try:
            out = fn(latents[i : i + 1])
        except torch.OutOfMemoryError as e:
            shape = tuple(latents.shape[2:])
            raise DecodeMemoryError(
                f"Decoding one whole volume (latent {shape}) ran out of {latents.device.type} memory. Decode in "
                f"tiles with decode_tile_size=N or (h, w, d) latent voxels (e.g. {max(MIN_TILE_SIDE, max(shape) // 2)}"
                "; approximate, measure it with duodiff.decoding.seam_report), free memory, or sample on CPU."
            ) from e
        outs.append(out if output_device is None else out.to(output_device))
    return torch.cat(outs)


def describe_decode(
    autoencoder: nn.Module, latents_shape: Sequence[int], tile_size: TileSize = "auto", *,
    overlap: float = DEFAULT_OVERLAP, halo: int = DEFAULT_HALO,
) -> str:
    """The decode path :func:`decode` takes for ``latents_shape`` without a memory budget (see
    :meth:`DecodePlan.describe`): ``"whole"`` or ``"tiled HxWxD overlap=O halo=K"``."""
    return resolve_tile_size(autoencoder, latents_shape, tile_size, halo=halo).describe(overlap)


# ---------------------------------------------------------------------------------------------- seam check
@dataclass(frozen=True)
class SeamReport:
    """Tiled vs whole decode of the same latents.

    Attributes:
        tile_size: latent tile used.
        overlap: tile overlap.
        halo: context voxels around each tile.
        max_abs_diff / mean_abs_diff: over all output voxels (raw decoder outputs for labels,
            intensities clamped to [0, 1] for images).
        psnr_db: PSNR of the tiled image against the whole one with data range 1 (images only).
        label_agreement: fraction of voxels with the same argmax class (labels only).
    """

    tile_size: tuple[int, int, int]
    overlap: float
    halo: int
    max_abs_diff: float
    mean_abs_diff: float
    psnr_db: float | None
    label_agreement: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def seam_report(
    autoencoder: nn.Module,
    latents: torch.Tensor,
    *,
    tile_size: int | Sequence[int],
    overlap: float = DEFAULT_OVERLAP,
    halo: int = DEFAULT_HALO,
    kind: Literal["image", "label"] = "image",
) -> SeamReport:
    """Decode ``latents`` whole and tiled and report how much the tiles change the output.

    Args:
        autoencoder: a MONAI ``AutoencoderKL``.
        latents: ``(N, C, h, w, d)`` latents (divided by the scale factor).
        tile_size: latent tile, an int or ``(h, w, d)``.
        overlap: tile overlap in ``[0, 1)``.
        halo: context voxels decoded around each tile.
        kind: ``"image"`` compares intensities clamped to [0, 1] and gives PSNR; ``"label"``
            compares logits and the argmax label maps.
    """
    if kind not in ("image", "label"):
        raise ValueError(f"kind must be 'image' or 'label', got {kind!r}.")
    _check_latents(latents)
    tile = _as_tile(tile_size, latents.shape[2:])
    with torch.inference_mode():
        whole = decode(autoencoder, latents, tile_size=None)
        tiled = decode(autoencoder, latents, tile_size=tile, overlap=overlap, halo=halo).to(whole.device)
    psnr = agreement = None
    if kind == "image":
        whole, tiled = whole.clamp(0, 1), tiled.clamp(0, 1)
        mse = float(((whole - tiled) ** 2).mean())
        psnr = float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)
    else:
        agreement = float((whole.argmax(1) == tiled.argmax(1)).float().mean())
    diff = (whole - tiled).abs()
    return SeamReport(
        tile_size=tile, overlap=float(overlap), halo=int(halo), max_abs_diff=float(diff.max()),
        mean_abs_diff=float(diff.mean()), psnr_db=psnr, label_agreement=agreement,
    )

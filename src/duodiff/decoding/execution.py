"""Decoding latents by a plan: whole volumes, sub-batches, or overlapping tiles with halo context."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .memory import _decode_fn, _profile
from .planning import DEFAULT_HALO, DEFAULT_OVERLAP, MIN_TILE_SIDE, TileSize, _check_latents, resolve_tile_size

__all__ = ["decode", "describe_decode", "DecodeMemoryError"]

logger = logging.getLogger(__name__)


class DecodeMemoryError(MemoryError):
    """An exact (whole-volume) decode ran out of device memory; the message says how to decode in tiles."""


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
    """Decode latents within a memory budget (see :mod:`duodiff.decoding` for the strategy).

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

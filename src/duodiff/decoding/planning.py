"""Planning a decode: tile sizes (as users and the command line give them) and :class:`DecodePlan`.

:func:`resolve_tile_size` turns ``tile_size`` (and an optional byte budget) into volumes per decoder call or
a latent tile with its halo; :mod:`duodiff.decoding.execution` carries the plan out.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .memory import _output_bytes, _profile, estimate_decode_bytes

__all__ = ["TileSize", "check_tile_size", "parse_tile_size", "DecodePlan", "resolve_tile_size", "DEFAULT_OVERLAP",
           "DEFAULT_HALO", "MIN_TILE_SIDE"]

logger = logging.getLogger(__name__)

#: ``None`` (whole batch in one call), ``"auto"`` (whole volumes one by one, or planned within an explicit
#: ``max_memory``), an int (cubic tile) or ``(h, w, d)``; sizes are in latent voxels.
TileSize = int | Sequence[int] | Literal["auto"] | None

#: Fraction of each tile side shared with its neighbour (blended with Gaussian weights).
DEFAULT_OVERLAP = 0.25
#: Latent voxels of context decoded around each tile and cropped away.
DEFAULT_HALO = 4
#: Smallest tile side (latent voxels) ``"auto"`` will choose; smaller tiles are mostly border.
MIN_TILE_SIDE = 4


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

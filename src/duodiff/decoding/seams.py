"""How much tiles change a decode: :func:`seam_report` decodes the same latents whole and tiled.

Tiling is approximate (the decoder's receptive field can exceed the halo, and ``GroupNorm`` sees one tile's
statistics); measure it on your own model before relying on tiles. ``docs/performance.md`` lists the
tolerances measured for the presets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

from .execution import decode
from .planning import DEFAULT_HALO, DEFAULT_OVERLAP, _as_tile, _check_latents

__all__ = ["SeamReport", "seam_report"]


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

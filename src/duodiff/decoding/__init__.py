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

Modules: :mod:`~duodiff.decoding.planning` (tile sizes, :class:`DecodePlan`), :mod:`~duodiff.decoding.memory`
(measured decoder memory), :mod:`~duodiff.decoding.execution` (:func:`decode`) and :mod:`~duodiff.decoding.seams`
(:func:`seam_report`).
"""

from __future__ import annotations

from .execution import DecodeMemoryError, decode, describe_decode
from .memory import CUDA_MEMORY_FRACTION, available_memory, estimate_decode_bytes, peak_tensor_bytes
from .planning import (
    DEFAULT_HALO,
    DEFAULT_OVERLAP,
    DecodePlan,
    TileSize,
    check_tile_size,
    parse_tile_size,
    resolve_tile_size,
)
from .seams import SeamReport, seam_report

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

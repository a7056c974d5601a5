"""The two stages of a :class:`~duodiff.DuoDiffusion` sampling call, as functions of the pipeline.

1. :func:`generate_labels`: label latents from each seed's noise -> decoded label maps.
2. :func:`generate_images`: label maps -> image latents denoised with the ControlNet -> decoded images.

Both decode through :func:`decode_checked`, which refuses NaN/Inf volumes and says which dtype to use instead;
:func:`run_in_batches` runs either stage batch by batch, halving the batch on CUDA out-of-memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

import torch

from .decoding import TileSize, decode, describe_decode
from .dtypes import autocast, autocast_dtype
from .io import NonFiniteError
from .output import DuoSample
from .sampling import denoise, initial_noise, stage_generators

if TYPE_CHECKING:  # pragma: no cover
    from .pipeline import DuoDiffusion
    from .sampling_options import SamplingPlan

__all__ = ["decode_checked", "generate_labels", "generate_images", "run_in_batches", "collect_pairs"]

#: the OOM retries log under the pipeline's name, where users and tests listen for them
logger = logging.getLogger("duodiff.pipeline")

T = TypeVar("T")


def decode_checked(pipe: DuoDiffusion, kind: str, latents: torch.Tensor, tile: TileSize,
                   seeds: Sequence[int] | None = None) -> torch.Tensor:
    """Decode scaled ``kind`` (``"label"`` / ``"image"``) latents ``(N, C, h, w, d)`` into float32
    ``(N, K or C_img, H, W, D)`` logits / images.

    Raises:
        NonFiniteError: a decoded sample holds NaN/Inf; the message names its seed (or index), the dtype and the fix.
    """
    ae = getattr(pipe, f"{kind}_autoencoder")
    out = decode(ae, latents / getattr(pipe.config, f"{kind}_scale_factor"), tile_size=tile)
    finite = torch.isfinite(out).flatten(1).all(1)
    if bool(finite.all()):
        return out
    dtype = autocast_dtype(pipe.device.type) or pipe.dtype
    bad = torch.nonzero(~finite).flatten().tolist()
    which = f"seeds {[int(seeds[i]) for i in bad]}" if seeds is not None else f"samples {bad}"
    if dtype == torch.float16:
        hint = ("float16 overflows beyond 65504 (a known failure of latent-diffusion decoders). Sample with "
                "dtype='bfloat16' (float32's range, fast on recent CPUs/GPUs) or dtype=None (float32).")
    elif dtype == torch.bfloat16:
        hint = "Sample with dtype=None (float32); if that fails too, the model's weights are broken."
    else:
        hint = "The model's weights or latents are broken (NaN/Inf in the checkpoint?); check the model."
    raise NonFiniteError(
        f"The {kind} autoencoder decoded NaN/Inf values for {len(bad)} of {len(finite)} sample(s) ({which}) "
        f"with dtype={str(dtype).removeprefix('torch.')}; duodiff does not return or save such volumes. {hint}"
    )


def generate_labels(pipe: DuoDiffusion, seeds: Sequence[int], plan: SamplingPlan,
                    context: torch.Tensor | None = None, null_context: torch.Tensor | None = None) -> torch.Tensor:
    """Stage 1 for ``seeds``: int64 label ids ``(len(seeds), 1, H, W, D)`` on the pipeline's device.

    ``context`` / ``null_context``: ``(len(seeds), 1, E)`` attribute contexts of a conditioned label UNet.
    """
    opts = plan.options
    gens = stage_generators(seeds, "label")
    noise = initial_noise(gens, pipe.config.label_latent_shape, pipe.device)
    if context is not None and null_context is not None:
        context, null_context = context.to(pipe.device), null_context.to(pipe.device)
    with autocast(pipe.device.type, plan.amp):
        z = denoise(pipe.label_unet, plan.new_scheduler("label"), noise, generators=gens,
                    stochastic=opts.stochastic, progress=opts.progress, desc="labels", context=context,
                    null_context=null_context, guidance_scale=opts.guidance_scale)
        return decode_checked(pipe, "label", z, opts.decode_tile_size, seeds).argmax(dim=1, keepdim=True)


def generate_images(pipe: DuoDiffusion, labels: torch.Tensor, seeds: Sequence[int], plan: SamplingPlan
                    ) -> torch.Tensor:
    """Stage 2 for int64 ``labels`` ``(n, 1, H, W, D)``: float32 images ``(n, C, H, W, D)`` in [0, 1]."""
    opts = plan.options
    gens = stage_generators(seeds, "image")
    noise = initial_noise(gens, pipe.config.image_latent_shape, pipe.device)
    with autocast(pipe.device.type, plan.amp):
        z = denoise(pipe.image_unet, plan.new_scheduler("image"), noise, generators=gens,
                    stochastic=opts.stochastic, controlnet=pipe.image_controlnet, condition=pipe.one_hot(labels),
                    conditioning_scale=opts.conditioning_scale, progress=opts.progress, desc="images")
        return decode_checked(pipe, "image", z, opts.decode_tile_size, seeds).clamp_(0.0, 1.0)


def run_in_batches(n: int, batch_size: int, fn: Callable[[int, int], T]) -> list[T]:
    """``[fn(start, stop) for each batch of range(n)]``; on CUDA out-of-memory the batch is retried at half size
    (logged), down to one sample."""
    results, start = [], 0
    while start < n:
        stop = min(start + batch_size, n)
        try:
            results.append(fn(start, stop))
        except torch.cuda.OutOfMemoryError:
            if stop - start == 1:
                raise
            batch_size = (stop - start) // 2
            logger.warning("CUDA out of memory with a batch of %d; retrying with batches of %d",
                           stop - start, batch_size)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        start = stop
    return results


def collect_pairs(pipe: DuoDiffusion, images: list[torch.Tensor], labels: list[torch.Tensor], seeds: list[int],
                  tile: TileSize, stages: Sequence[str] = ("label", "image")) -> DuoSample:
    """The batches of float32 images ``(n, C, H, W, D)`` and int64 labels ``(n, 1, H, W, D)`` as one
    :class:`~duodiff.output.DuoSample` on the CPU, with the seeds and the decode path of each stage that ran."""
    c = pipe.config
    paths = {kind: describe_decode(getattr(pipe, f"{kind}_autoencoder"), (1, *getattr(c, f"{kind}_latent_shape")), tile)
             for kind in stages}
    return DuoSample(images=torch.cat(images).cpu(), labels=torch.cat(labels).cpu(), affine=pipe.affine,
                     spacing=c.spacing, label_names=c.label_names, seeds=seeds, decode=paths)

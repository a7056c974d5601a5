"""The one denoising loop of duodiff, and per-sample seeding.

Both stages (label latents, and image latents with the ControlNet) run through :func:`denoise`.
Randomness is drawn per sample from its own CPU ``torch.Generator``, so a sample depends only on
its seed: it is the same whether made alone or in a batch, on CPU or CUDA.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .schedulers import STOCHASTIC_SAMPLERS, Sampler
from .seeding import hash_seed

__all__ = ["stage_generators", "initial_noise", "model_output", "denoise"]

_STAGE_SALT = {"label": 0, "image": 1}


def stage_generators(seeds: Sequence[int], stage: str) -> list[torch.Generator]:
    """One CPU generator per sample for one stage (``"label"`` or ``"image"``).

    The two stages get independent streams, so ``generate_images(labels, seed=s)`` reproduces
    stage 2 of ``sample(seed=s)`` for the same labels.
    """
    if stage not in _STAGE_SALT:
        raise ValueError(f"stage must be one of {list(_STAGE_SALT)}, got {stage!r}.")
    return [torch.Generator().manual_seed(hash_seed("duodiff", stage, int(s))) for s in seeds]


def initial_noise(
    generators: Sequence[torch.Generator], shape: Sequence[int], device: torch.device
) -> torch.Tensor:
    """Standard normal noise, one draw per generator.

    Returns:
        float32 tensor ``(len(generators), *shape)`` on ``device``.
    """
    noise = torch.stack([torch.randn(tuple(shape), generator=g) for g in generators])
    return noise.to(device)


def model_output(
    unet: nn.Module,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    context: torch.Tensor | None = None,
    controlnet: nn.Module | None = None,
    condition: torch.Tensor | None = None,
    conditioning_scale: float = 1.0,
) -> torch.Tensor:
    """The UNet's prediction for noisy latents, with the ControlNet's residuals added when one is given.

    The one place the UNet and ControlNet are wired together: the ControlNet training stage
    (:class:`duodiff.train.stages.ControlledUNet`) and :func:`denoise` both call it.

    Args:
        unet: a MONAI ``DiffusionModelUNet``.
        x: ``(B, C, h, w, d)`` noisy latents.
        timesteps: int64 ``(B,)`` diffusion timesteps.
        context: optional ``(B, 1, E)`` cross-attention context.
        controlnet: optional MONAI ``ControlNet``; its ``(down, mid)`` residuals go to the UNet.
        condition: ``(B, K, H, W, D)`` ControlNet input (one-hot labels); used only with ``controlnet``.
        conditioning_scale: multiplier of the ControlNet residuals.

    Returns:
        ``(B, C, h, w, d)`` noise, v or x0 (the UNet's ``prediction_type``), in the UNet's output dtype.
    """
    residuals: dict = {}
    if controlnet is not None:
        down, mid = controlnet(x=x, timesteps=timesteps, controlnet_cond=condition,
                               conditioning_scale=conditioning_scale, context=context)
        residuals = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
    return unet(x=x, timesteps=timesteps, context=context, **residuals)


def denoise(
    unet: nn.Module,
    scheduler: Sampler,
    latents: torch.Tensor,
    *,
    generators: Sequence[torch.Generator],
    stochastic: bool,
    controlnet: nn.Module | None = None,
    condition: torch.Tensor | None = None,
    conditioning_scale: float = 1.0,
    context: torch.Tensor | None = None,
    null_context: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    progress: bool = True,
    desc: str = "denoising",
) -> torch.Tensor:
    """Run the reverse diffusion from ``latents`` (noise) to clean latents.

    Args:
        unet: a MONAI ``DiffusionModelUNet``.
        scheduler: a fresh sampler from :func:`duodiff.schedulers.make_scheduler` on which ``set_timesteps`` was
            called. Multistep samplers (PNDM, DPM-Solver++, UniPC) keep the previous steps' outputs: use a new
            one for every call.
        latents: float32 ``(B, C, h, w, d)`` initial noise.
        generators: one CPU generator per sample; used for the per-step noise of stochastic samplers.
        stochastic: whether ``scheduler.step`` draws noise (DDPM); then the step runs per sample so
            each sample's noise comes from its own generator.
        controlnet: optional MONAI ``ControlNet``; its residuals are added to the UNet's.
        condition: float ``(B, K, H, W, D)`` ControlNet input (one-hot labels), required with ``controlnet``.
        conditioning_scale: multiplier of the ControlNet residuals.
        context: optional ``(B, 1, E)`` cross-attention context (attribute conditioning).
        null_context: ``(B, 1, E)`` unconditional context for classifier-free guidance.
        guidance_scale: ``1`` disables guidance; ``w > 1`` uses ``uncond + w * (cond - uncond)``.
        progress: show a tqdm bar.
        desc: the bar's label.

    Returns:
        float32 ``(B, C, h, w, d)`` denoised latents.
    """
    if (controlnet is None) != (condition is None):
        raise ValueError("controlnet and condition must be given together.")
    use_cfg = context is not None and null_context is not None and guidance_scale != 1.0
    batch = latents.shape[0]

    def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ctx = context
        cond = condition
        if use_cfg:
            x = torch.cat([x, x])
            t = torch.cat([t, t])
            ctx = torch.cat([null_context, context])  # type: ignore[list-item]
            cond = None if condition is None else torch.cat([condition, condition])
        out = model_output(unet, x, t, context=ctx, controlnet=controlnet, condition=cond,
                           conditioning_scale=conditioning_scale).float()
        if use_cfg:
            uncond, cond_out = out.chunk(2)
            out = uncond + guidance_scale * (cond_out - uncond)
        return out

    step: Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]
    if stochastic:
        def step(out: torch.Tensor, t: int, x: torch.Tensor) -> torch.Tensor:
            # 2b. per-sample noise: each sample draws from its own generator (batch-invariant)
            parts = []
            for i, g in enumerate(generators):
                if g.device != torch.device("cpu"):
                    raise ValueError("per-sample generators must be CPU generators.")
                parts.append(scheduler.step(out[i : i + 1].cpu(), t, x[i : i + 1].cpu(), generator=g)[0])
            return torch.cat(parts).to(x.device)
    else:
        def step(out: torch.Tensor, t: int, x: torch.Tensor) -> torch.Tensor:
            return scheduler.step(out, t, x)[0]

    x = latents.float()
    # the timesteps as Python ints, read once: int(t) of a CUDA tensor would sync the host at every step
    timesteps = scheduler.timesteps.tolist()
    # No tqdm object at all without a bar: even a disabled bar takes tqdm's process-shared lock, and this
    # loop runs in forked DataLoader workers and background generation threads.
    steps = tqdm(timesteps, desc=desc, leave=False) if progress else timesteps
    for t_int in steps:
        t_batch = torch.full((batch,), t_int, device=x.device, dtype=torch.long)
        # 1. predict noise (or v / x0) with the UNet (+ ControlNet residuals)
        out = predict(x, t_batch)
        # 2. x_t -> x_{t-1}
        x = step(out, t_int, x)
    return x


def is_stochastic(sampler: str | None) -> bool:
    """Whether the sampler named ``sampler`` draws noise at each step (``None``, each stage's own sampler, never
    does: DDIM or rflow)."""
    return sampler is not None and sampler.lower() in STOCHASTIC_SAMPLERS

"""Loss functions of the five Duo-Diffusion stages.

* ``label_autoencoder``: one-hot labels in; cross-entropy + Dice reconstruction + KL.
* ``image_autoencoder``: L1 reconstruction + KL (+ optional 1 - SSIM).
* ``label_unet`` / ``image_unet``: denoising (epsilon or v) MSE on cached, scaled latents (DDPM schedule).
* ``image_controlnet``: initialised from the image UNet, UNet frozen, conditioned on the real one-hot label.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

from ..attributes import make_context
from ..sampling import model_output
from ..schedulers import RECTIFIED_FLOW, make_scheduler
from .loop import StepContext

__all__ = ["random_patches", "AutoencoderStep", "ControlledUNet", "autoencoder_loss", "label_autoencoder_loss",
           "image_autoencoder_loss", "diffusion_loss", "kl_loss",
           "encode_latents"]


class AutoencoderStep(nn.Module):
    """Encode -> reparameterise with given noise -> decode, in one ``forward`` (so DDP sees it).

    MONAI's ``AutoencoderKL.forward`` draws its own noise from the global RNG; passing ``eps`` keeps training
    reproducible and resumable.
    """

    def __init__(self, autoencoder: nn.Module) -> None:
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, x: torch.Tensor, eps: torch.Tensor, downsampled: bool = False,
                latent_noise: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """``(recon, mu, sigma)``; with ``downsampled=True`` also the decoding of the 2x average-pooled latent
        (``(N, C, H/2, W/2, D/2)``, for :func:`autoencoder_loss`'s scale-equivariance term).

        ``latent_noise`` (the shape of ``eps``, unscaled latent units) is added to the sampled latent before
        decoding (:func:`latent_noise_augmentation`)."""
        mu, sigma = self.autoencoder.encode(x)
        z = mu + sigma * eps.to(mu.dtype)
        if latent_noise is not None:
            z = z + latent_noise.to(z.dtype)
        out = (self.autoencoder.decode(z), mu, sigma)
        if downsampled:
            out = (*out, self.autoencoder.decode(F.avg_pool3d(z, 2)))
        return out


class ControlledUNet(nn.Module):
    """A frozen diffusion UNet driven by a trainable ControlNet (one ``forward`` for DDP)."""

    def __init__(self, unet: nn.Module, controlnet: nn.Module) -> None:
        super().__init__()
        self.unet = unet.requires_grad_(False)
        self.controlnet = controlnet

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The UNet's prediction ``(N, C, h, w, d)`` for latents ``x`` at timesteps ``t`` ``(N,)`` given the
        one-hot ``cond`` ``(N, K, H, W, D)``, through :func:`duodiff.sampling.model_output` (as sampling does)."""
        return model_output(self.unet, x, t, controlnet=self.controlnet, condition=cond)

    def train(self, mode: bool = True) -> ControlledUNet:
        super().train(mode)
        self.unet.eval()
        return self


def random_patches(volumes: tuple[torch.Tensor, ...], size: tuple[int, ...] | None,
                   generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """The same random ``size`` crop of each sample of every tensor in ``volumes`` (``(N, C, H, W, D)`` each).

    One offset per sample, drawn from ``generator`` (uniform over every position where the crop fits); with
    ``size=None`` the volumes are returned unchanged. Autoencoders are convolutional, so training on patches
    (as MAISI trains its VAE) costs ``prod(size) / prod(H, W, D)`` of a whole-volume step and still
    reconstructs whole volumes.
    """
    if size is None:
        return volumes
    spatial = volumes[0].shape[2:]
    n = volumes[0].shape[0]
    starts = [torch.randint(0, s - p + 1, (n,), generator=generator) for s, p in zip(spatial, size)]
    out = []
    for v in volumes:
        out.append(torch.stack([
            v[i, :, starts[0][i]:starts[0][i] + size[0], starts[1][i]:starts[1][i] + size[1],
              starts[2][i]:starts[2][i] + size[2]] for i in range(n)
        ]))
    return tuple(out)


def kl_loss(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma) || N(0, 1)) summed over latent voxels, averaged over the batch."""
    mu, sigma = mu.float(), sigma.float()
    kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2).clamp_min(1e-12)) - 1)
    return kl.flatten(1).sum(1).mean()


def autoencoder_loss(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    kind: str,
    num_classes: int,
    latent_shape: tuple[int, ...],
    kl_weight: float,
    dice_weight: float,
    ssim_weight: float = 0.0,
    patch_size: tuple[int, int, int] | None = None,
    downsample_factor: int = 1,
    scale_equivariance_weight: float = 0.0,
    latent_noise_std: float = 0.0,
    scale_factor: float = 1.0,
):
    """Loss function for an autoencoder stage: :func:`label_autoencoder_loss` or :func:`image_autoencoder_loss`,
    chosen once here (the returned function never looks at ``kind``).

    Args:
        images: float32 ``(N, C, H, W, D)`` in [0, 1] (image stage).
        labels: uint8 ``(N, 1, H, W, D)`` (label stage).
        kind: ``"label"`` or ``"image"``.
        ssim_weight, scale_equivariance_weight: image stage only (see :func:`image_autoencoder_loss`).
        dice_weight, num_classes: label stage only (see :func:`label_autoencoder_loss`).
        patch_size: train on one random crop of this size per sample (:func:`random_patches`); ``None`` = whole
            volumes. Sides must be multiples of ``downsample_factor`` (the autoencoder's).
        latent_shape: ``(C, h, w, d)`` of a whole volume's latent (the patch latent is derived from it).
        latent_noise_std, scale_factor: decoder noise augmentation, both stages (:func:`latent_noise_augmentation`).

    Raises:
        ValueError: ``kind`` is neither ``"label"`` nor ``"image"``.
    """
    if patch_size is not None:
        patch_size = tuple(int(p) for p in patch_size)
        latent_shape = (latent_shape[0], *(p // downsample_factor for p in patch_size))
    if kind == "label":
        return label_autoencoder_loss(labels, num_classes=num_classes, latent_shape=latent_shape,
                                      kl_weight=kl_weight, dice_weight=dice_weight, patch_size=patch_size,
                                      latent_noise_std=latent_noise_std, scale_factor=scale_factor)
    if kind == "image":
        return image_autoencoder_loss(images, latent_shape=latent_shape, kl_weight=kl_weight, ssim_weight=ssim_weight,
                                      patch_size=patch_size, scale_equivariance_weight=scale_equivariance_weight,
                                      latent_noise_std=latent_noise_std, scale_factor=scale_factor)
    raise ValueError(f"kind must be 'label' or 'image', got {kind!r}.")


def _posterior_noise(ctx: StepContext, latent_shape: tuple[int, ...]) -> torch.Tensor:
    """The reparameterisation noise ``(B, C, h, w, d)`` of one step, from the step's generator."""
    return torch.randn((len(ctx.indices), *latent_shape), generator=ctx.generator).to(ctx.device)


def latent_noise_augmentation(ctx: StepContext, latent_shape: tuple[int, ...], latent_noise_std: float,
                              scale_factor: float) -> torch.Tensor | None:
    """Gaussian noise ``(B, C, h, w, d)`` (unscaled latent units) to add to the latent before decoding, or ``None``
    when ``latent_noise_std`` is 0.

    Each sample gets its own noise level ``s ~ U(0, latent_noise_std)`` in the *scaled* latent units the diffusion
    model works in (real latents have std ~1 there), i.e. ``s / scale_factor`` in the decoder's units. A decoder
    trained so learns to map slightly-off latents to clean images instead of amplifying the residual errors of a
    diffusion model's samples into high-frequency texture. This is noise conditioning augmentation (Ho et al. 2022,
    "Cascaded Diffusion Models for High Fidelity Image Generation", JMLR 23) applied to the decoder of a latent
    diffusion model; meant for decoder-only fine-tunes (``decoder_only = true``), where the latent and its scale
    factor are fixed. Draws from the step's generator (reproducible, resumable).
    """
    if latent_noise_std <= 0:
        return None
    b = len(ctx.indices)
    level = torch.rand((b, *([1] * len(latent_shape))), generator=ctx.generator) * (latent_noise_std / scale_factor)
    return (level * torch.randn((b, *latent_shape), generator=ctx.generator)).to(ctx.device)


def label_autoencoder_loss(labels: torch.Tensor, *, num_classes: int, latent_shape: tuple[int, ...],
                           kl_weight: float, dice_weight: float, patch_size: tuple[int, ...] | None = None,
                           latent_noise_std: float = 0.0, scale_factor: float = 1.0):
    """Label autoencoder loss: cross-entropy + ``dice_weight`` x Dice (MONAI ``DiceLoss``, softmax, background
    excluded) of the reconstructed logits against the one-hot label, + ``kl_weight`` x KL.

    Args:
        labels: uint8 ``(N, 1, H, W, D)`` class ids.
        latent_shape: ``(C, h, w, d)`` of one (patch) latent.
        patch_size: one random crop per sample, or ``None`` for whole volumes.
        latent_noise_std, scale_factor: decoder noise augmentation (:func:`latent_noise_augmentation`; 0 = off).
    """
    dice = DiceLoss(softmax=True, include_background=False)

    def loss_fn(model: nn.Module, ctx: StepContext):
        eps = _posterior_noise(ctx, latent_shape)
        (lab,) = random_patches((labels[ctx.indices],), patch_size, ctx.generator)
        lab = lab.to(ctx.device).long()
        x = F.one_hot(lab[:, 0], num_classes).movedim(-1, 1).float()
        noise = latent_noise_augmentation(ctx, latent_shape, latent_noise_std, scale_factor)
        recon, mu, sigma = model(x, eps, False, noise)
        recon = recon.float()
        ce = F.cross_entropy(recon, lab[:, 0])
        dl = dice(recon, x)
        kl = kl_loss(mu, sigma)
        return ce + dice_weight * dl + kl_weight * kl, {"ce": ce.item(), "dice": dl.item(), "kl": kl.item()}

    return loss_fn


def image_autoencoder_loss(images: torch.Tensor, *, latent_shape: tuple[int, ...], kl_weight: float,
                           ssim_weight: float = 0.0, patch_size: tuple[int, ...] | None = None,
                           scale_equivariance_weight: float = 0.0, latent_noise_std: float = 0.0,
                           scale_factor: float = 1.0):
    """Image autoencoder loss: L1 + ``kl_weight`` x KL, optionally + SSIM and scale-equivariance terms.

    Args:
        images: float32 ``(N, C, H, W, D)`` in [0, 1].
        latent_shape: ``(C, h, w, d)`` of one (patch) latent.
        ssim_weight: weight of ``1 - SSIM`` (MONAI ``SSIMLoss``, 3D Gaussian window 11, sigma 1.5, data range 1) on
            the clamped reconstruction, added to L1; favours local structure over L1's blur.
        patch_size: one random crop per sample, or ``None`` for whole volumes.
        scale_equivariance_weight: weight of an L1 term asking the decoder to turn the 2x average-pooled latent
            into the 2x average-pooled image (scale-equivariance regularisation, Skorokhodov et al. 2025,
            "Improving the Diffusability of Autoencoders", arXiv:2502.14831). It removes the high-frequency,
            checkerboard-like components a weakly regularised latent drifts into, which a diffusion model cannot
            predict and samples as noise. Needs patch / volume sides divisible by ``2 * downsample_factor``.
        latent_noise_std, scale_factor: decoder noise augmentation (:func:`latent_noise_augmentation`; 0 = off).
    """
    ssim = None
    if ssim_weight > 0:
        from monai.losses import SSIMLoss

        ssim = SSIMLoss(spatial_dims=3, data_range=1.0)

    def loss_fn(model: nn.Module, ctx: StepContext):
        eps = _posterior_noise(ctx, latent_shape)
        (x,) = random_patches((images[ctx.indices],), patch_size, ctx.generator)
        x = x.to(ctx.device)
        noise = latent_noise_augmentation(ctx, latent_shape, latent_noise_std, scale_factor)
        if scale_equivariance_weight > 0:
            recon, mu, sigma, recon_down = model(x, eps, True, noise)
        else:
            recon, mu, sigma = model(x, eps, False, noise)
        l1 = (recon.float() - x).abs().mean()
        kl = kl_loss(mu, sigma)
        logs = {"l1": l1.item(), "kl": kl.item()}
        loss = l1 + kl_weight * kl
        if scale_equivariance_weight > 0:
            se = (recon_down.float() - F.avg_pool3d(x, 2)).abs().mean()
            loss = loss + scale_equivariance_weight * se
            logs["scale_equivariance_l1"] = se.item()
        if ssim is not None:
            s_loss = ssim(recon.float().clamp(0, 1), x)
            loss = loss + ssim_weight * s_loss
            logs["ssim_loss"] = s_loss.item()
        return loss, logs

    return loss_fn


def diffusion_loss(
    latents: torch.Tensor,
    scheduler_cfg,
    *,
    one_hot: torch.Tensor | None = None,
    attributes: torch.Tensor | None = None,
    context_dim: int | None = None,
    condition_dropout: float = 0.0,
):
    """Denoising loss on cached scaled latents ``(N, C, h, w, d)``: the MSE of the UNet's prediction of the noise
    (``epsilon``), of ``v`` (``v_prediction``) or, for ``rectified_flow`` (Liu et al. 2023), of the velocity
    ``z0 - noise`` at ``z_t = (1 - t/T) z0 + (t/T) noise``; ``t`` uniform in ``0 .. T-1``.

    Args:
        one_hot: ``(N, K, H, W, D)`` ControlNet condition (image_controlnet stage).
        attributes: standardised attribute values ``(N, A)`` for a conditioned label UNet; each column is dropped
            with probability ``condition_dropout`` and all of them together with the same probability, so the
            network also learns the unconditional model used by classifier-free guidance.
        context_dim: the UNet's ``cross_attention_dim``.
    """
    T = scheduler_cfg.num_train_timesteps
    prediction = scheduler_cfg.prediction_type
    flow = prediction == RECTIFIED_FLOW
    # rectified flow: MONAI's RFlowScheduler (straight paths); otherwise the DDPM noise schedule
    scheduler = make_scheduler("rflow" if flow else "ddpm", scheduler_cfg)
    if flow:
        scheduler = scheduler.scheduler

    def loss_fn(model: nn.Module, ctx: StepContext):
        z0 = latents[ctx.indices].to(ctx.device)
        noise = torch.randn(z0.shape, generator=ctx.generator).to(ctx.device)
        # t uniform in 0..T-1 for both objectives (for rectified flow: RFlowScheduler's uniform discrete
        # sampling, drawn here from the seeded generator)
        t = torch.randint(0, T, (z0.shape[0],), generator=ctx.generator).to(ctx.device)
        zt = scheduler.add_noise(original_samples=z0, noise=noise, timesteps=t)
        if attributes is not None:
            z = attributes[ctx.indices]
            keep = (torch.rand(z.shape, generator=ctx.generator) >= condition_dropout).float()
            keep = keep * (torch.rand((z.shape[0], 1), generator=ctx.generator) >= condition_dropout).float()
            context = make_context(z, keep, context_dim).to(ctx.device)
            pred = model(x=zt, timesteps=t, context=context)
        elif one_hot is None:
            pred = model(x=zt, timesteps=t)
        else:
            pred = model(zt, t, one_hot[ctx.indices].to(ctx.device))
        if flow:
            target = z0 - noise  # the velocity of x_t = (1 - t/T) z0 + (t/T) noise, towards the data
        elif prediction == "epsilon":
            target = noise
        else:
            target = scheduler.get_velocity(z0, noise, t)
        mse = F.mse_loss(pred.float(), target)
        return mse, {}

    return loss_fn


@torch.inference_mode()
def encode_latents(
    autoencoder: nn.Module, x: torch.Tensor, *, device: torch.device, batch_size: int = 8
) -> torch.Tensor:
    """Posterior means ``(N, C, h, w, d)`` of ``x`` (float32, unscaled), computed in chunks."""
    autoencoder.eval().to(device)
    out = []
    for i in range(0, len(x), batch_size):
        mu, _ = autoencoder.encode(x[i : i + batch_size].to(device))
        out.append(mu.float().cpu())
    return torch.cat(out)

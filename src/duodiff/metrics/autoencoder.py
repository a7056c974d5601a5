"""Autoencoder fidelity: how well the image and label autoencoders reconstruct real cases.

No latent diffusion model can produce finer detail than its decoder, so the reconstruction quality of
the autoencoders is an upper bound on the quality of everything the pipeline generates. Each real case
is encoded to its posterior mean (no sampling), decoded, and compared with the input:

* image autoencoder: PSNR (dB, data range 1), SSIM (:func:`duodiff.metrics.ssim`) and mean absolute
  error (L1) of the decoded image clamped to [0, 1], per case;
* label autoencoder: per-class Dice (:func:`duodiff.metrics.dice_per_class`) between the argmax of the
  decoded one-hot map and the input label.

>>> from duodiff.metrics import image_reconstruction  # doctest: +SKIP
>>> image_reconstruction(pipe.image_autoencoder, real.images)["psnr_db"]["mean"]  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..dice import dice_per_class
from .ssim import ssim

__all__ = ["psnr", "reconstruct", "image_reconstruction", "label_reconstruction"]

#: Gaussian window of the reconstruction SSIM (Wang et al. 2004; MONAI's default).
SSIM_KERNEL_SIZE = 11
SSIM_KERNEL_SIGMA = 1.5


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio per volume (``monai.metrics.PSNRMetric``, data range 1).

    Args:
        x, y: float ``(N, C, H, W, D)`` in [0, 1].

    Returns:
        float32 ``(N,)`` in dB: ``10 log10(1 / MSE)``; ``inf`` for identical volumes.
    """
    from monai.metrics import PSNRMetric

    if x.shape != y.shape or x.ndim != 5:
        raise ValueError(f"x and y must both be (N, C, H, W, D) of one shape, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}.")
    return torch.as_tensor(PSNRMetric(max_val=1.0, reduction="none")(x.float(), y.float())).reshape(-1).float()


@torch.no_grad()
def reconstruct(autoencoder: nn.Module, x: torch.Tensor, *, batch_size: int = 8) -> torch.Tensor:
    """Decode the posterior mean of ``x``: ``decode(encode(x)[0])``, in batches, without sampling.

    Args:
        autoencoder: a MONAI ``AutoencoderKL`` (run in eval mode on its own device and dtype).
        x: float ``(N, C, H, W, D)`` autoencoder input (images in [0, 1], or one-hot labels).
        batch_size: volumes per call.

    Returns:
        float32 ``(N, C_out, H, W, D)`` decoder output on the CPU (intensities or logits, not clamped).
    """
    if x.ndim != 5:
        raise ValueError(f"x must be (N, C, H, W, D), got {tuple(x.shape)}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    param = next(autoencoder.parameters())
    was_training = autoencoder.training
    autoencoder.eval()
    try:
        out = []
        for i in range(0, x.shape[0], batch_size):
            mu, _ = autoencoder.encode(x[i:i + batch_size].to(param.device, param.dtype))
            out.append(autoencoder.decode(mu).float().cpu())
    finally:
        autoencoder.train(was_training)
    y = torch.cat(out)
    if y.shape[2:] != x.shape[2:]:
        raise ValueError(f"The autoencoder returned {tuple(y.shape[2:])} for input sides {tuple(x.shape[2:])}; "
                         "pass volumes whose sides it can reconstruct (the model's volume_shape).")
    return y


def _summary(values: torch.Tensor) -> dict[str, float]:
    v = values.double()
    return {"mean": float(v.mean()), "std": float(v.std()) if v.numel() > 1 else 0.0,
            "median": float(v.median()), "min": float(v.min()), "max": float(v.max())}


def image_reconstruction(
    autoencoder: nn.Module,
    images: torch.Tensor,
    *,
    names: Sequence[str] | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """PSNR, SSIM and L1 of image autoencoder reconstructions (posterior mean, clamped to [0, 1]).

    Args:
        autoencoder: the image ``AutoencoderKL``.
        images: float ``(N, C, H, W, D)`` real images in [0, 1].
        names: case names for the per-case list (default ``case_0`` ...).
        batch_size: volumes per autoencoder call.

    Returns:
        ``{"psnr_db", "ssim", "l1"}`` (each ``{"mean", "std", "median", "min", "max"}`` over cases),
        ``"per_case"`` (``[{"name", "psnr_db", "ssim", "l1"}]``), ``"num_cases"`` and the settings. PSNR is
        capped at 100 dB so that a perfect reconstruction stays JSON-serialisable.
    """
    if images.ndim != 5 or not images.is_floating_point():
        raise ValueError(f"images must be float (N, C, H, W, D), got {images.dtype} {tuple(images.shape)}.")
    n = images.shape[0]
    names = list(names) if names is not None else [f"case_{i}" for i in range(n)]
    if len(names) != n:
        raise ValueError(f"Got {len(names)} names for {n} images.")
    x = images.float()
    rec = reconstruct(autoencoder, x, batch_size=batch_size).clamp_(0.0, 1.0)
    if rec.shape != x.shape:
        raise ValueError(f"The image autoencoder returned {tuple(rec.shape)} for images {tuple(x.shape)}.")
    p = psnr(rec, x).clamp(max=100.0)
    s = ssim(rec, x, kernel_size=SSIM_KERNEL_SIZE, kernel_sigma=SSIM_KERNEL_SIGMA)
    l1 = (rec - x).abs().flatten(1).mean(1)
    return {
        "psnr_db": _summary(p), "ssim": _summary(s), "l1": _summary(l1), "num_cases": n,
        "per_case": [{"name": nm, "psnr_db": round(float(a), 4), "ssim": round(float(b), 6), "l1": round(float(c), 6)}
                     for nm, a, b, c in zip(names, p, s, l1)],
        "data_range": 1.0, "ssim_window": {"kernel": "gaussian", "size": SSIM_KERNEL_SIZE, "sigma": SSIM_KERNEL_SIGMA},
        "encoding": "posterior mean, decoded output clamped to [0, 1]",
    }


def label_reconstruction(
    autoencoder: nn.Module,
    labels: torch.Tensor,
    *,
    num_classes: int,
    label_names: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Per-class Dice of label autoencoder reconstructions (one-hot in, argmax of the decoded logits out).

    Args:
        autoencoder: the label ``AutoencoderKL`` (``num_classes`` input and output channels).
        labels: int ``(N, 1, H, W, D)`` real label ids in ``range(num_classes)``.
        num_classes: classes including background.
        label_names: class names, background first.
        names: case names for the per-case list.
        batch_size: volumes per autoencoder call.

    Returns:
        ``{"dice": {class: mean over cases}, "dice_min": {class: worst case}, "mean_dice", "num_cases",
        "per_case": [{"name", "dice": {class: value}}]}``. A class absent from both input and
        reconstruction scores 1, absent from the input only 0 (as in :func:`dice_per_class`).
    """
    if labels.ndim != 5 or labels.shape[1] != 1 or labels.is_floating_point():
        raise ValueError(f"labels must be integer (N, 1, H, W, D), got {labels.dtype} {tuple(labels.shape)}.")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"label ids must be in range(0, {num_classes}), found {int(labels.min())}.."
                         f"{int(labels.max())}. Pass the model's num_classes.")
    class_names = list(label_names) if label_names else [f"class_{k}" for k in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"Got {len(class_names)} label_names for num_classes={num_classes}.")
    n = labels.shape[0]
    names = list(names) if names is not None else [f"case_{i}" for i in range(n)]
    if len(names) != n:
        raise ValueError(f"Got {len(names)} names for {n} label maps.")
    one_hot = F.one_hot(labels[:, 0].long(), num_classes).movedim(-1, 1).float()
    logits = reconstruct(autoencoder, one_hot, batch_size=batch_size)
    if logits.shape[1] != num_classes:
        raise ValueError(f"The label autoencoder outputs {logits.shape[1]} channels, expected num_classes="
                         f"{num_classes}.")
    dice = dice_per_class(logits.argmax(1, keepdim=True), labels.cpu(), num_classes)  # (N, K - 1)
    fg = class_names[1:]
    return {
        "dice": {c: float(dice[:, j].double().mean()) for j, c in enumerate(fg)},
        "dice_min": {c: float(dice[:, j].min()) for j, c in enumerate(fg)},
        "mean_dice": float(dice.double().mean()), "num_cases": n,
        "per_case": [{"name": nm, "dice": {c: round(float(d[j]), 6) for j, c in enumerate(fg)}}
                     for nm, d in zip(names, dice)],
        "encoding": "one-hot input, posterior mean, argmax of the decoded logits",
    }

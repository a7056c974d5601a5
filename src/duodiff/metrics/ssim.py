"""SSIM and MS-SSIM between volumes, and pairwise MS-SSIM within a set (a diversity measure).

:func:`ssim` wraps :class:`monai.metrics.SSIMMetric` (single scale, Wang et al.'s Gaussian window 11,
sigma 1.5), used for autoencoder reconstructions.

Wraps :class:`monai.metrics.MultiScaleSSIMMetric`. MONAI checks, for ``L`` scale weights and kernel
size ``k``, that every side satisfies ``side // max(1, L - 1)**2 > k - 1``, and each scale halves the
volume, which must stay at least ``k`` voxels wide; the default 5 weights therefore need large
volumes. :func:`ms_ssim_weights` picks the most scales a shape allows (the first ``L`` of MONAI's
default weights, renormalised to sum to 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["DEFAULT_WEIGHTS", "ms_ssim_weights", "ssim", "ms_ssim", "pairwise_ms_ssim"]

#: MONAI's (and Wang et al.'s) 5 scale weights.
DEFAULT_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def ms_ssim_weights(spatial_shape: Sequence[int], kernel_size: int = 7, max_scales: int = 5) -> tuple[float, ...]:
    """The scale weights for the most scales (<= ``max_scales``) that ``spatial_shape`` allows.

    Raises:
        ValueError: a side is smaller than ``kernel_size`` (not even one scale fits).
    """
    if min(spatial_shape) < kernel_size:
        raise ValueError(f"SSIM with kernel_size {kernel_size} needs every side >= {kernel_size}, got "
                         f"{tuple(spatial_shape)}. Pass a smaller kernel_size.")
    best = 1
    for n in range(2, max_scales + 1):
        monai_ok = all(s // max(1, n - 1) ** 2 > kernel_size - 1 for s in spatial_shape)
        fits = all(s // 2 ** (n - 1) >= kernel_size for s in spatial_shape)
        if monai_ok and fits:
            best = n
    w = DEFAULT_WEIGHTS[:best]
    return tuple(x / sum(w) for x in w)


def _metric(spatial_shape: Sequence[int], kernel_size: int, weights: Sequence[float] | None):
    from monai.metrics import MultiScaleSSIMMetric

    w = tuple(weights) if weights is not None else ms_ssim_weights(spatial_shape, kernel_size)
    return MultiScaleSSIMMetric(spatial_dims=len(spatial_shape), data_range=1.0, kernel_size=kernel_size,
                                weights=w, reduction="none"), w


@torch.no_grad()
def ssim(x: torch.Tensor, y: torch.Tensor, *, kernel_size: int = 11, kernel_sigma: float = 1.5) -> torch.Tensor:
    """Single-scale SSIM of volume pairs (``monai.metrics.SSIMMetric``, data range 1, Gaussian window).

    Args:
        x, y: float ``(N, C, H, W, D)`` in [0, 1].
        kernel_size: Gaussian window size (every side must be at least this).
        kernel_sigma: Gaussian window standard deviation in voxels.

    Returns:
        float32 ``(N,)``, mean SSIM over voxels and channels; 1 for identical volumes.
    """
    from monai.metrics import SSIMMetric

    if x.shape != y.shape or x.ndim != 5:
        raise ValueError(f"x and y must both be (N, C, H, W, D) of one shape, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}.")
    if min(x.shape[2:]) < kernel_size:
        raise ValueError(f"SSIM with kernel_size {kernel_size} needs every side >= {kernel_size}, got "
                         f"{tuple(x.shape[2:])}. Pass a smaller kernel_size.")
    metric = SSIMMetric(spatial_dims=3, data_range=1.0, win_size=kernel_size, kernel_sigma=kernel_sigma,
                        reduction="none")
    return torch.as_tensor(metric(x.float(), y.float())).reshape(-1).float()


@torch.no_grad()
def ms_ssim(x: torch.Tensor, y: torch.Tensor, *, kernel_size: int = 7,
            weights: Sequence[float] | None = None) -> torch.Tensor:
    """MS-SSIM of volume pairs.

    Args:
        x, y: float ``(N, C, H, W, D)`` in [0, 1].
        kernel_size: Gaussian window size.
        weights: scale weights; default :func:`ms_ssim_weights` of the shape.

    Returns:
        float32 ``(N,)`` in [0, 1]; 1 for identical volumes.
    """
    if x.shape != y.shape or x.ndim != 5:
        raise ValueError(f"x and y must both be (N, C, H, W, D) of one shape, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}.")
    metric, _ = _metric(x.shape[2:], kernel_size, weights)
    return metric(x.float(), y.float()).reshape(-1)


def pairwise_ms_ssim(
    volumes: torch.Tensor,
    *,
    max_pairs: int | None = 500,
    seed: int = 0,
    kernel_size: int = 7,
    batch_size: int = 32,
) -> dict[str, float | int | list[float]]:
    """MS-SSIM over pairs of distinct volumes of one set (high = similar = low diversity).

    Args:
        volumes: float ``(N, C, H, W, D)`` in [0, 1], ``N >= 2``.
        max_pairs: evaluate a seeded random subset of at most this many of the ``N (N - 1) / 2`` pairs
            (``None``: all).
        seed: seed of the pair subset.
        kernel_size: Gaussian window size.
        batch_size: pairs per call.

    Returns:
        ``{"mean", "std", "num_pairs", "weights", "kernel_size"}``.
    """
    n = volumes.shape[0]
    if n < 2:
        raise ValueError(f"Pairwise MS-SSIM needs at least 2 volumes, got {n}.")
    pairs = torch.combinations(torch.arange(n), 2)
    if max_pairs is not None and pairs.shape[0] > max_pairs:
        g = torch.Generator().manual_seed(seed)
        pairs = pairs[torch.randperm(pairs.shape[0], generator=g)[:max_pairs]]
    metric, w = _metric(volumes.shape[2:], kernel_size, None)
    vals = []
    with torch.no_grad():
        for i in range(0, pairs.shape[0], batch_size):
            p = pairs[i:i + batch_size]
            vals.append(metric(volumes[p[:, 0]].float(), volumes[p[:, 1]].float()).reshape(-1))
    v = torch.cat(vals).double()
    return {"mean": float(v.mean()), "std": float(v.std()) if v.numel() > 1 else 0.0, "num_pairs": int(v.numel()),
            "weights": [round(x, 6) for x in w], "kernel_size": kernel_size}

"""Maximum mean discrepancy (MMD) with a Gaussian kernel between two feature sets."""

from __future__ import annotations

import torch

__all__ = ["median_bandwidth", "gaussian_mmd"]


def median_bandwidth(x: torch.Tensor, y: torch.Tensor) -> float:
    """The median heuristic: median Euclidean distance between distinct points of the pooled set."""
    z = torch.cat([x, y]).double()
    d = torch.cdist(z, z)
    off = d[~torch.eye(z.shape[0], dtype=torch.bool)]
    med = float(off.median()) if off.numel() else 0.0
    return med if med > 0 else 1.0


def gaussian_mmd(x: torch.Tensor, y: torch.Tensor, *, bandwidth: float | None = None) -> dict[str, float]:
    """Squared MMD (biased V-statistic) with kernel ``k(a, b) = exp(-|a - b|^2 / (2 bandwidth^2))``.

    The biased estimate is ``>= 0`` and exactly 0 for identical sets.

    Args:
        x: ``(M, F)`` features.
        y: ``(N, F)`` features.
        bandwidth: kernel width; default :func:`median_bandwidth` of the pooled features.

    Returns:
        ``{"mmd2": ..., "bandwidth": ...}``.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(x.shape[0], y.shape[0]) < 1:
        raise ValueError(f"x and y must be non-empty (M, F) and (N, F) features, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}.")
    if bandwidth is not None and not bandwidth > 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth!r}.")
    h = float(bandwidth) if bandwidth is not None else median_bandwidth(x, y)
    x, y = x.double(), y.double()

    def k(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.exp(-torch.cdist(a, b).pow(2) / (2 * h * h))

    mmd2 = k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()
    return {"mmd2": max(float(mmd2), 0.0), "bandwidth": h}

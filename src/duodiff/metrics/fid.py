"""Fréchet distance between feature distributions, and FID-2.5D (per slicing plane) for 3D volumes.

The matrix square root uses ``torch.linalg.eigh`` in float64 (no scipy):
``tr sqrt(S1 S2) = tr sqrt(sqrt(S1) S2 sqrt(S1))``, and the inner matrix is symmetric PSD.
"""

from __future__ import annotations

import torch
from torch import nn

from ..segmenter import PLANES
from .features import slice_features

__all__ = ["sqrtm_psd", "feature_statistics", "frechet_distance_from_stats", "frechet_distance", "fid_2p5d"]


def sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix (negative eigenvalues from round-off are clamped).

    Args:
        matrix: ``(F, F)`` symmetric.

    Returns:
        float64 ``(F, F)`` symmetric ``R`` with ``R @ R ≈ matrix``.
    """
    m = matrix.double()
    m = (m + m.T) / 2
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(F,)`` and covariance ``(F, F)`` (float64, unbiased) of ``(M, F)`` features (``M >= 2``)."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be (M, F) with M >= 2 samples, got {tuple(features.shape)}.")
    f = features.double()
    return f.mean(0), torch.cov(f.T).reshape(f.shape[1], f.shape[1])


def frechet_distance_from_stats(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor,
                                sigma2: torch.Tensor) -> float:
    """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrt(S1 S2))``, the Fréchet distance of two Gaussians."""
    s1_half = sqrtm_psd(sigma1)
    inner = s1_half @ sigma2.double() @ s1_half
    tr_covmean = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    diff = mu1.double() - mu2.double()
    value = diff @ diff + torch.trace(sigma1.double()) + torch.trace(sigma2.double()) - 2 * tr_covmean
    return max(float(value), 0.0)


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance between two feature sets ``(M_a, F)`` and ``(M_b, F)``."""
    if features_a.ndim != 2 or features_b.ndim != 2 or features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"Feature sets must be (M, F) with the same F, got {tuple(features_a.shape)} and "
                         f"{tuple(features_b.shape)}.")
    return frechet_distance_from_stats(*feature_statistics(features_a), *feature_statistics(features_b))


def fid_2p5d(real: torch.Tensor, synthetic: torch.Tensor, network: nn.Module, *,
             batch_size: int = 256) -> dict[str, float]:
    """FID-2.5D: the Fréchet distance of slice features per plane, and their mean.

    Args:
        real: float ``(N, C, H, W, D)`` in [0, 1].
        synthetic: float ``(M, C, H, W, D)`` in [0, 1] with the same ``C, H, W, D``.
        network: slice feature network (see :mod:`duodiff.metrics.features`).

    Returns:
        ``{"axial": ..., "coronal": ..., "sagittal": ..., "mean": ...}``.
    """
    if real.shape[1:] != synthetic.shape[1:]:
        raise ValueError(f"real {tuple(real.shape)} and synthetic {tuple(synthetic.shape)} volumes must share "
                         "(C, H, W, D); crop/pad the real volumes to the model's volume_shape first.")
    out = {p: frechet_distance(slice_features(real, network, p, batch_size=batch_size),
                               slice_features(synthetic, network, p, batch_size=batch_size)) for p in PLANES}
    out["mean"] = sum(out[p] for p in PLANES) / len(PLANES)
    return out

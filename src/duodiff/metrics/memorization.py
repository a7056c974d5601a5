"""Memorisation check: how close is each synthetic image to its nearest real (training) image?

Similarity is the normalised cross-correlation (NCC, Pearson correlation of voxel intensities) of
whole volumes on the same grid: 1 for an exact copy (up to an affine intensity change), about 0 for
unrelated noise. The SSIM of each synthetic image with its nearest real one is reported as well.
Compare the distribution with the real-to-real nearest-neighbour NCC: distinct subjects of one
dataset are already fairly correlated after cropping around the same structure.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["normalized_cross_correlation", "nearest_real"]


def normalized_cross_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """NCC of every volume in ``a`` with every volume in ``b``.

    Args:
        a: ``(M, C, H, W, D)``.
        b: ``(N, C, H, W, D)`` with the same ``C, H, W, D``.

    Returns:
        float64 ``(M, N)`` in [-1, 1]; 0 where a volume is constant.
    """
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"Volumes must share (C, H, W, D), got {tuple(a.shape)} and {tuple(b.shape)}.")

    def unit(x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1).double()
        x = x - x.mean(1, keepdim=True)
        norm = x.norm(dim=1, keepdim=True)
        return torch.where(norm > 1e-12, x / norm.clamp_min(1e-12), torch.zeros_like(x))

    return (unit(a) @ unit(b).T).clamp_(-1.0, 1.0)


def _summary(x: np.ndarray) -> dict[str, float]:
    return {"mean": float(np.mean(x)), "median": float(np.median(x)), "p95": float(np.percentile(x, 95)),
            "max": float(np.max(x)), "min": float(np.min(x))}


def nearest_real(
    synthetic: torch.Tensor,
    real: torch.Tensor,
    *,
    real_names: Sequence[str] | None = None,
    synthetic_names: Sequence[str] | None = None,
    threshold: float = 0.95,
    exclude_self: bool = False,
    with_ssim: bool = True,
) -> dict[str, Any]:
    """For each synthetic volume, the most correlated real volume; flag near-copies.

    Args:
        synthetic: float ``(M, C, H, W, D)``.
        real: float ``(N, C, H, W, D)``, the training images the model may have memorised.
        real_names, synthetic_names: case names for the report.
        threshold: NCC at or above which a synthetic volume is flagged as a near-copy.
        exclude_self: ignore the diagonal (use when ``synthetic`` *is* ``real``, to get the
            real-to-real reference distribution).
        with_ssim: also compute the SSIM of each volume with its nearest real one.

    Returns:
        ``{"ncc": summary, "ssim": summary, "threshold", "num_flagged", "flagged": [{synthetic, real, ncc}],
        "nearest": [{synthetic, real, ncc}]}``.
    """
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be an NCC value in [-1, 1], got {threshold!r}.")
    ncc = normalized_cross_correlation(synthetic, real)
    if exclude_self:
        if real.shape[0] < 2 or synthetic.shape[0] != real.shape[0]:
            raise ValueError("exclude_self needs the same set (of >= 2 volumes) as synthetic and real.")
        ncc.fill_diagonal_(-2.0)
    best, idx = ncc.max(dim=1)
    rn = list(real_names) if real_names is not None else [str(i) for i in range(real.shape[0])]
    sn = list(synthetic_names) if synthetic_names is not None else [str(i) for i in range(synthetic.shape[0])]
    nearest = [{"synthetic": sn[i], "real": rn[int(j)], "ncc": round(float(v), 6)}
               for i, (v, j) in enumerate(zip(best, idx))]
    flagged = [d for d in nearest if d["ncc"] >= threshold]
    out: dict[str, Any] = {"ncc": _summary(best.numpy()), "threshold": threshold, "num_flagged": len(flagged),
                           "flagged": flagged, "nearest": nearest}
    if with_ssim:
        from monai.metrics import SSIMMetric

        win = min(7, *synthetic.shape[2:])
        win -= 1 - win % 2  # odd window
        metric = SSIMMetric(spatial_dims=3, data_range=1.0, win_size=win, reduction="none")
        with torch.no_grad():
            ssim = torch.cat([metric(synthetic[i:i + 16].float(), real[idx[i:i + 16]].float()).reshape(-1)
                              for i in range(0, synthetic.shape[0], 16)])
        out["ssim"] = _summary(ssim.double().numpy())
        for d, s in zip(nearest, ssim.tolist()):
            d["ssim"] = round(float(s), 6)
    return out

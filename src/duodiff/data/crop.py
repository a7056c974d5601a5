"""Crop / zero-pad a channel-first case to the model's volume shape, centred on its label foreground.

The one crop of real data: ``duodiff train`` prepares its cases with it (:mod:`duodiff.train.data`) and
``duodiff evaluate`` brings real volumes to the model's grid with it (:mod:`duodiff.metrics.data`), so real and
synthetic volumes are compared on the grid the model was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["crop_or_pad"]


def _centred_window(size: int, target: int, center: float) -> tuple[int, int, int, int]:
    """(start, stop, pad_before, pad_after) of a window of ``target`` voxels centred on ``center``."""
    if size >= target:
        start = int(round(center - target / 2))
        start = min(max(start, 0), size - target)
        return start, start + target, 0, 0
    pad = target - size
    return 0, size, pad // 2, pad - pad // 2


def crop_or_pad(image: np.ndarray, label: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray, float]:
    """Crop/pad channel-first arrays to ``shape`` centred on the foreground centroid.

    Returns:
        image ``(C, *shape)``, label ``(1, *shape)`` and the fraction of foreground voxels that fell outside.
    """
    fg = np.argwhere(label[0] > 0)
    center = fg.mean(0) if len(fg) else np.array(label.shape[1:]) / 2
    slices, pads = [], []
    for size, target, c in zip(label.shape[1:], shape, center):
        a, b, p0, p1 = _centred_window(size, int(target), float(c))
        slices.append(slice(a, b))
        pads.append((p0, p1))
    sl = (slice(None), *slices)
    img = np.pad(image[sl], [(0, 0), *pads], mode="constant", constant_values=0.0)
    lab = np.pad(label[sl], [(0, 0), *pads], mode="constant", constant_values=0)
    total = int((label > 0).sum())
    lost = 0.0 if total == 0 else 1.0 - int((lab > 0).sum()) / total
    return img, lab, lost

"""Label-map statistics: per-class volumes, Wasserstein-1 distances, connected components, class coverage.

Connected components need ``scipy`` (``pip install 'duodiff[metrics]'``) or ``scikit-image``; without
either, :func:`component_counts` raises ``ImportError`` and :func:`label_statistics` reports the
component section as skipped with that message.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["class_volumes", "wasserstein_1d", "component_counts", "contains_all_classes", "label_statistics"]


def _labels_np(labels: torch.Tensor | np.ndarray) -> np.ndarray:
    arr = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if arr.ndim == 5:
        if arr.shape[1] != 1:
            raise ValueError(f"labels must be (N, 1, H, W, D) or (N, H, W, D) class ids, got {arr.shape}.")
        arr = arr[:, 0]
    if arr.ndim != 4:
        raise ValueError(f"labels must be (N, 1, H, W, D) or (N, H, W, D) class ids, got {arr.shape}.")
    if np.issubdtype(arr.dtype, np.floating) or arr.dtype == bool:
        raise TypeError(f"labels must have an integer dtype (class ids), got {arr.dtype}.")
    return arr


def class_volumes(labels: torch.Tensor | np.ndarray, num_classes: int,
                  spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """Foreground class volumes in mm^3.

    Args:
        labels: int ``(N, 1, H, W, D)`` or ``(N, H, W, D)``.
        num_classes: classes including background.
        spacing: voxel size in mm.

    Returns:
        float64 ``(N, num_classes - 1)``: column ``k - 1`` is class ``k``.
    """
    arr = _labels_np(labels)
    voxel = float(np.prod([float(s) for s in spacing]))
    flat = arr.reshape(arr.shape[0], -1)
    counts = np.stack([(flat == k).sum(1) for k in range(1, num_classes)], axis=1)
    return counts.astype(np.float64) * voxel


def wasserstein_1d(u: Sequence[float] | np.ndarray, v: Sequence[float] | np.ndarray) -> float:
    """Wasserstein-1 (earth mover's) distance between two 1-D empirical distributions.

    ``∫ |F_u(t) - F_v(t)| dt`` over the pooled sorted values (the same formula as
    ``scipy.stats.wasserstein_distance``). Same units as the inputs; 0 for identical samples, ``c`` for
    a sample shifted by ``c``.
    """
    u, v = np.asarray(u, dtype=np.float64).ravel(), np.asarray(v, dtype=np.float64).ravel()
    if u.size == 0 or v.size == 0:
        raise ValueError(f"Both samples must be non-empty, got sizes {u.size} and {v.size}.")
    u, v = np.sort(u), np.sort(v)
    pooled = np.sort(np.concatenate([u, v]))
    deltas = np.diff(pooled)
    cdf_u = np.searchsorted(u, pooled[:-1], side="right") / u.size
    cdf_v = np.searchsorted(v, pooled[:-1], side="right") / v.size
    return float(np.sum(np.abs(cdf_u - cdf_v) * deltas))


def _cc_label_fn(connectivity: int):
    try:
        from scipy import ndimage

        structure = ndimage.generate_binary_structure(3, connectivity)
        return lambda mask: int(ndimage.label(mask, structure=structure)[1])
    except ImportError:
        pass
    try:
        from skimage.measure import label as sk_label

        return lambda mask: int(sk_label(mask, connectivity=connectivity, return_num=True)[1])
    except ImportError:
        raise ImportError(
            "Connected-component counts need scipy or scikit-image; install them with "
            "pip install 'duodiff[metrics]' (scipy)."
        ) from None


def component_counts(labels: torch.Tensor | np.ndarray, num_classes: int, *, connectivity: int = 3) -> np.ndarray:
    """Number of connected components of each foreground class in each label map.

    Args:
        labels: int ``(N, 1, H, W, D)`` or ``(N, H, W, D)``.
        num_classes: classes including background.
        connectivity: 1 (faces, 6-neighbourhood), 2 (18) or 3 (faces, edges and corners, 26).

    Returns:
        int64 ``(N, num_classes - 1)``; 0 where a class is absent.

    Raises:
        ImportError: neither scipy nor scikit-image is installed.
    """
    if connectivity not in (1, 2, 3):
        raise ValueError(f"connectivity must be 1, 2 or 3, got {connectivity!r}.")
    arr = _labels_np(labels)
    count = _cc_label_fn(connectivity)
    return np.array([[count(arr[i] == k) for k in range(1, num_classes)] for i in range(arr.shape[0])],
                    dtype=np.int64).reshape(arr.shape[0], num_classes - 1)


def contains_all_classes(labels: torch.Tensor | np.ndarray, num_classes: int) -> np.ndarray:
    """bool ``(N,)``: whether each label map contains every foreground class ``1..num_classes-1``."""
    arr = _labels_np(labels)
    flat = arr.reshape(arr.shape[0], -1)
    return np.stack([(flat == k).any(1) for k in range(1, num_classes)], axis=1).all(1)


def _summary(x: np.ndarray) -> dict[str, float]:
    return {"mean": float(np.mean(x)), "std": float(np.std(x)), "median": float(np.median(x)),
            "min": float(np.min(x)), "max": float(np.max(x))}


def label_statistics(
    real: torch.Tensor | np.ndarray,
    synthetic: torch.Tensor | np.ndarray,
    *,
    num_classes: int,
    label_names: Sequence[str] | None = None,
    real_spacing: Sequence[float] = (1.0, 1.0, 1.0),
    synthetic_spacing: Sequence[float] = (1.0, 1.0, 1.0),
    connectivity: int = 3,
) -> dict[str, Any]:
    """Compare the label maps of two sets.

    Returns:
        ``{"classes": {name: {"volume_mm3": {"real": summary, "synthetic": summary}, "wasserstein_mm3",
        "wasserstein_relative", "components": {...}}}, "all_classes_fraction": {"real", "synthetic"},
        "components_note": ...}``. ``wasserstein_relative`` is W1 divided by the mean real volume.
        Component entries hold the mean count and the fraction of maps with exactly one component
        (among maps containing the class); they are replaced by a note if scipy/scikit-image is missing.
    """
    names = list(label_names) if label_names else [f"class_{k}" for k in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"Got {len(names)} label_names for num_classes={num_classes}.")
    vr = class_volumes(real, num_classes, real_spacing)
    vs = class_volumes(synthetic, num_classes, synthetic_spacing)
    try:
        cr = component_counts(real, num_classes, connectivity=connectivity)
        cs = component_counts(synthetic, num_classes, connectivity=connectivity)
        neighbours = {1: 6, 2: 18, 3: 26}[connectivity]
        note = f"{neighbours}-connectivity"
    except ImportError as e:
        cr = cs = None
        note = f"skipped: {e}"
    classes: dict[str, Any] = {}
    for k in range(1, num_classes):
        entry: dict[str, Any] = {
            "volume_mm3": {"real": _summary(vr[:, k - 1]), "synthetic": _summary(vs[:, k - 1])},
            "wasserstein_mm3": wasserstein_1d(vr[:, k - 1], vs[:, k - 1]),
        }
        mean_real = float(np.mean(vr[:, k - 1]))
        entry["wasserstein_relative"] = entry["wasserstein_mm3"] / mean_real if mean_real > 0 else None
        if cr is not None and cs is not None:
            comps = {}
            for which, c in (("real", cr[:, k - 1]), ("synthetic", cs[:, k - 1])):
                present = c[c > 0]
                comps[which] = {"mean": float(np.mean(c)),
                                "fraction_single": float(np.mean(present == 1)) if present.size else None,
                                "max": int(np.max(c))}
            entry["components"] = comps
        classes[names[k]] = entry
    return {
        "classes": classes,
        "all_classes_fraction": {"real": float(np.mean(contains_all_classes(real, num_classes))),
                                 "synthetic": float(np.mean(contains_all_classes(synthetic, num_classes)))},
        "components_note": note,
    }

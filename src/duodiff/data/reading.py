"""Reading one labelled case, reoriented to RAS, after checking that it can be used; real-image normalisation.

A case is refused (:class:`BadCaseError`, naming it) when a file is unreadable, an image holds NaN/Inf, a
label holds non-integer or negative values (never rounded or truncated), or when image and label are not on
the same voxel grid: after reorientation to RAS their shapes must be equal and their affines (voxel size,
direction and origin) must agree within :data:`GEOMETRY_TOLERANCE_MM`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .layout import Case

__all__ = ["CaseData", "BadCaseError", "read_case", "check_same_grid", "normalise_intensity", "GEOMETRY_TOLERANCE_MM",
           "DEFAULT_INTENSITY_PERCENTILES"]

#: Largest difference (mm) between an image's and its label's affine entries (voxel size x direction, origin).
GEOMETRY_TOLERANCE_MM = 1e-3
#: Per-volume intensity percentiles mapped to 0 and 1: ``[data].intensity_percentiles``'s default, and what
#: models saved before duodiff recorded their preprocessing were trained with.
DEFAULT_INTENSITY_PERCENTILES = (0.5, 99.5)


class BadCaseError(ValueError):
    """A case cannot be used (unreadable file, NaN/Inf, image and label on different grids, bad label values)."""


@dataclass
class CaseData:
    """A case read by :func:`read_case`, reoriented to RAS.

    Attributes:
        name: the case name.
        image: float32 ``(C, H, W, D)`` as stored (no normalisation).
        label: int64 ``(1, H, W, D)`` class values as stored.
        affine: 4x4 voxel-to-RAS-mm matrix of both (after reorientation / resampling).
        spacing: voxel size in mm.
    """

    name: str
    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]


def _loaders():
    from monai.transforms import LoadImage, Orientation

    return (LoadImage(image_only=True, ensure_channel_first=True, dtype=np.float32),
            LoadImage(image_only=True, ensure_channel_first=True, dtype=None),  # labels keep their stored dtype
            Orientation(axcodes="RAS", labels=None))


def _geometry(affine: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    spacing = tuple(round(float(v), 6) for v in np.linalg.norm(affine[:3, :3], axis=0))
    origin = tuple(round(float(v), 6) for v in affine[:3, 3])
    return spacing, origin


def check_same_grid(name: str, image_file: Path, image: Any, label_file: Path, label: Any) -> None:
    """Refuse an image/label pair whose reoriented shapes or affines differ (see :data:`GEOMETRY_TOLERANCE_MM`).

    Raises:
        BadCaseError: naming the case, with both shapes, or both spacings and origins.
    """
    si, sl = tuple(int(s) for s in image.shape[1:]), tuple(int(s) for s in label.shape[1:])
    if si != sl:
        raise BadCaseError(
            f"case {name!r}: image shape {si} != label shape {sl}; image and label must be on the same voxel grid. "
            "Fix or remove the case."
        )
    ai = np.asarray(image.affine, dtype=np.float64)
    al = np.asarray(label.affine, dtype=np.float64)
    if np.abs(ai[:3, :4] - al[:3, :4]).max() > GEOMETRY_TOLERANCE_MM:
        (spi, oi), (spl, ol) = _geometry(ai), _geometry(al)
        direction = "" if (spi != spl or oi != ol) else " (their directions differ)"
        raise BadCaseError(
            f"case {name!r}: image {image_file.name} and label {label_file.name} are not on the same voxel grid "
            f"(affines after reorientation to RAS differ by more than {GEOMETRY_TOLERANCE_MM} mm){direction}: "
            f"image spacing {spi} mm, origin {oi} mm; label spacing {spl} mm, origin {ol} mm. Resample the label "
            "onto the image grid (nearest neighbour) or fix its header, or remove the case."
        )


def read_case(case: Case, *, target_spacing: Sequence[float] | None = None) -> CaseData:
    """Read one case, reoriented to RAS, after checking that it can be used.

    Args:
        case: from :func:`find_cases` or :func:`cases_from_datalist`.
        target_spacing: resample image (bilinear) and label (nearest) to this voxel size in mm, after the checks.

    Raises:
        BadCaseError: an unreadable file, not 3D volumes (one per file, or one 4D MSD image with channels last),
            image and label on different voxel grids, NaN/Inf in the image, non-integer or negative label values.
    """
    load_image, load_label, orient = _loaders()
    name = case.name
    try:
        image_parts = [orient(load_image(str(p))) for p in case.images]
        label = orient(load_label(str(case.label)))
    except Exception as e:  # MONAI / nibabel raise many types for corrupt files
        raise BadCaseError(
            f"case {name!r}: cannot read {[str(p) for p in case.images]} / {str(case.label)!r}: {e}"
        ) from e
    for path, arr in zip(case.images, image_parts):
        multi_channel_ok = len(case.images) == 1 and arr.ndim == 4
        if arr.ndim != 4 or (arr.shape[0] != 1 and not multi_channel_ok):
            raise BadCaseError(
                f"case {name!r}: {path} loads as an array of shape {tuple(arr.shape)} (channel first); duodiff "
                "needs one 3D volume per file (nnU-Net _0000, _0001, ...) or one 4D MSD image with channels last."
            )
    if label.ndim != 4 or label.shape[0] != 1:
        raise BadCaseError(
            f"case {name!r}: label {case.label} loads as an array of shape {tuple(label.shape)} (channel first); "
            "duodiff needs one 3D volume per file."
        )
    for path, part in zip(case.images, image_parts):
        check_same_grid(name, Path(path), part, Path(case.label), label)
    image_np = np.concatenate([np.asarray(p, dtype=np.float32) for p in image_parts])
    if not np.isfinite(image_np).all():
        raise BadCaseError(f"case {name!r}: the image contains NaN or Inf values.")
    label_np = np.asarray(label)
    if np.issubdtype(label_np.dtype, np.floating):
        bad = ~np.isfinite(label_np) | (label_np != np.round(label_np))
        if bad.any():
            examples = [np.format_float_positional(v, unique=True) for v in np.unique(label_np[bad])[:3]]
            raise BadCaseError(
                f"case {name!r}: the label {case.label.name} contains non-integer values (e.g. "
                f"{', '.join(examples)}); labels must be integer class ids. duodiff never rounds "
                "or truncates them: fix the file (e.g. write np.rint(label).astype(np.uint8) if the values are "
                "rounding errors)."
            )
    if label_np.size and label_np.min() < 0:
        raise BadCaseError(f"case {name!r}: the label {case.label.name} contains negative values; labels must be "
                           "class ids >= 0.")
    affine = np.asarray(label.affine, dtype=np.float64)
    if target_spacing:
        from monai.data import MetaTensor
        from monai.transforms import Spacing

        pixdim = [float(s) for s in target_spacing]
        img_t = Spacing(pixdim=pixdim, mode="bilinear")(MetaTensor(image_np, affine=label.affine))
        lab_t = Spacing(pixdim=pixdim, mode="nearest")(MetaTensor(label_np.astype(np.float32), affine=label.affine))
        image_np = np.asarray(img_t, dtype=np.float32)
        label_np = np.asarray(lab_t)
        affine = np.asarray(lab_t.affine, dtype=np.float64)
    spacing, _ = _geometry(affine)
    return CaseData(name, np.ascontiguousarray(image_np, dtype=np.float32),
                    np.ascontiguousarray(np.rint(label_np).astype(np.int64)), affine,
                    tuple(float(s) for s in spacing))  # type: ignore[arg-type]


def normalise_intensity(image: np.ndarray, percentiles: Sequence[float], name: str) -> np.ndarray:
    """Clip every channel at its ``percentiles`` (lo, hi) and scale it to [0, 1] (real-data preprocessing).

    Args:
        image: float32 ``(C, H, W, D)``; not modified.
        percentiles: ``(lo, hi)`` in [0, 100], e.g. a model's recorded ``intensity_percentiles``.
        name: the case, for errors.

    Raises:
        BadCaseError: a channel is constant (it cannot be normalised).
    """
    lo_p, hi_p = (float(p) for p in percentiles)
    out = np.empty_like(image, dtype=np.float32)
    for c in range(image.shape[0]):
        lo, hi = np.percentile(image[c], [lo_p, hi_p])
        if hi <= lo:
            raise BadCaseError(f"case {name!r}: channel {c} is constant; cannot normalise it.")
        out[c] = np.clip((image[c] - lo) / (hi - lo), 0.0, 1.0)
    return out

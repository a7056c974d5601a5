"""The cases of an MSD / nnU-Net v2 raw folder and the labels of its ``dataset.json``: the one reader.

Every part of duodiff that reads labelled NIfTI folders (``duodiff train``, ``duodiff evaluate``,
``duodiff export``, :meth:`~duodiff.SyntheticPairDataset.from_folder` and ``duodiff preview``) lists cases
with :func:`find_cases` and reads them with :func:`read_case`, so they accept and refuse the same cases with
the same messages.

Layouts (https://github.com/MIC-DKFZ/nnUNet/blob/master/documentation/dataset_format.md)::

    <folder>/imagesTr/<case>.nii.gz                  MSD: one 3D image, or one 4D image with channels last
    <folder>/imagesTr/<case>_0000.nii.gz, _0001 ...  nnU-Net v2: one 3D file per channel
    <folder>/labelsTr/<case>.nii.gz                  the label map of every case
    <folder>/dataset.json                            "labels": MSD {"0": "background", ...} or
                                                     nnU-Net v2 {"background": 0, ...}

Files may end in ``.nii.gz`` or ``.nii``; hidden files (``.x``, macOS ``._x.nii.gz``) and other files are
ignored. Every label needs an image and every image a label.

A case is refused (:class:`BadCaseError`, naming it) when a file is unreadable, an image holds NaN/Inf, a
label holds non-integer or negative values (never rounded or truncated), or when image and label are not on
the same voxel grid: after reorientation to RAS their shapes must be equal and their affines (voxel size,
direction and origin) must agree within :data:`GEOMETRY_TOLERANCE_MM`.

Example:
    >>> from duodiff.data.folders import find_cases, read_case  # doctest: +SKIP
    >>> pair = read_case(find_cases("Task04_Hippocampus")[0])  # doctest: +SKIP
    >>> pair.image.shape, pair.label.dtype  # doctest: +SKIP
    ((1, 35, 51, 35), dtype('int64'))
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "Case",
    "CaseData",
    "BadCaseError",
    "DatasetJsonError",
    "find_cases",
    "cases_from_datalist",
    "read_case",
    "check_same_grid",
    "normalise_intensity",
    "read_dataset_labels",
    "read_label_names",
    "read_channel_names",
    "dataset_label_names",
    "NIFTI_ENDINGS",
    "GEOMETRY_TOLERANCE_MM",
    "DEFAULT_INTENSITY_PERCENTILES",
]

#: File endings of NIfTI files in ``imagesTr`` / ``labelsTr``.
NIFTI_ENDINGS = (".nii.gz", ".nii")
#: Largest difference (mm) between an image's and its label's affine entries (voxel size x direction, origin).
GEOMETRY_TOLERANCE_MM = 1e-3
#: Per-volume intensity percentiles mapped to 0 and 1: ``[data].intensity_percentiles``'s default, and what
#: models saved before duodiff recorded their preprocessing were trained with.
DEFAULT_INTENSITY_PERCENTILES = (0.5, 99.5)

_CHANNEL = re.compile(r"^(?P<name>.+)_(?P<channel>\d{4})$")


class BadCaseError(ValueError):
    """A case cannot be used (unreadable file, NaN/Inf, image and label on different grids, bad label values)."""


class DatasetJsonError(ValueError):
    """A ``dataset.json`` cannot be used (invalid JSON, region-based or malformed ``labels``)."""


@dataclass(frozen=True)
class Case:
    """One labelled case on disk.

    Attributes:
        name: case identifier (the label file name without ``.nii.gz`` / ``.nii``).
        images: one file per channel in channel order (nnU-Net), or one 3D/4D file (MSD).
        label: the label map file.
    """

    name: str
    images: tuple[Path, ...]
    label: Path


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


# ------------------------------------------------------------------------------------------ listing
def _strip_nifti(name: str) -> str | None:
    for ending in NIFTI_ENDINGS:
        if name.endswith(ending):
            return name[: -len(ending)]
    return None


def _nifti_files(folder: Path) -> dict[str, Path]:
    """stem -> path for the NIfTI files of ``folder`` (hidden files such as macOS ``._x.nii.gz`` skipped)."""
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        stem = _strip_nifti(p.name)
        if stem is None or p.name.startswith(".") or not p.is_file():
            continue
        if stem in out:
            raise ValueError(f"{str(folder)!r} holds both {out[stem].name!r} and {p.name!r}; keep one of them.")
        out[stem] = p
    return out


def find_cases(folder: str | os.PathLike, *, cases: Sequence[str] | None = None) -> list[Case]:
    """The labelled cases of an MSD / nnU-Net v2 raw folder (``imagesTr/`` + ``labelsTr/``), sorted by name.

    Args:
        folder: the dataset folder.
        cases: only these case names, in this order (duplicates dropped); all must exist.

    Raises:
        FileNotFoundError: the folder or its ``imagesTr`` / ``labelsTr`` is missing, the dataset is empty, a
            label has no image or an image has no label.
        ValueError: a case mixes both layouts, its channel files are not numbered ``_0000, _0001, ...``,
            a file exists as both ``.nii`` and ``.nii.gz``, or ``cases`` names absent cases.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"Dataset folder {str(root)!r} does not exist.")
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir() or not labels_dir.is_dir():
        raise FileNotFoundError(
            f"{str(root)!r} must contain 'imagesTr' and 'labelsTr' folders (MSD / nnU-Net raw layout, as "
            f"`duodiff sample` writes); found imagesTr={images_dir.is_dir()}, labelsTr={labels_dir.is_dir()}."
        )
    images = _nifti_files(images_dir)
    labels = _nifti_files(labels_dir)
    if not labels and not images:
        raise FileNotFoundError(f"No label files (*.nii.gz or *.nii) in {str(labels_dir)!r}: the dataset is empty.")
    plain: dict[str, Path] = {}
    channels: dict[str, dict[int, Path]] = {}
    for stem, path in images.items():
        m = _CHANNEL.match(stem)
        if stem in labels:
            plain[stem] = path
        elif m and m.group("name") in labels:
            channels.setdefault(m.group("name"), {})[int(m.group("channel"))] = path
        else:
            case = m.group("name") if m else stem
            raise FileNotFoundError(
                f"Image {path.name} has no label: expected '{case}.nii.gz' in {str(labels_dir)!r}. Every image in "
                "imagesTr needs a label; add it or remove the image."
            )
    found = []
    for name, label in labels.items():
        files = channels.get(name, {})
        if files and name in plain:
            raise ValueError(
                f"Case {name!r} in {str(images_dir)!r} has both {plain[name].name!r} (MSD layout) and "
                f"{files[min(files)].name!r} (nnU-Net layout); keep one layout."
            )
        if files:
            order = sorted(files)
            if order != list(range(len(order))):
                raise ValueError(
                    f"Case {name!r}: channel files must be numbered _0000, _0001, ... without gaps, found "
                    f"{[f'_{c:04d}' for c in order]} in {str(images_dir)!r}."
                )
            found.append(Case(name, tuple(files[c] for c in order), label))
        elif name in plain:
            found.append(Case(name, (plain[name],), label))
        else:
            raise FileNotFoundError(
                f"Label {label.name} has no image: expected '{name}.nii.gz' (MSD) or '{name}_0000.nii.gz' "
                f"(nnU-Net) in {str(images_dir)!r}."
            )
    if cases is not None:
        by_name = {c.name: c for c in found}
        missing = [c for c in cases if c not in by_name]
        if missing:
            raise ValueError(
                f"{len(missing)} requested case(s) have no image+label pair in {str(root)!r}: {missing[:5]}"
                f"{'...' if len(missing) > 5 else ''}. Available e.g. {sorted(by_name)[:3]}."
            )
        found = [by_name[c] for c in dict.fromkeys(cases)]
    return found


def cases_from_datalist(path: str | os.PathLike) -> list[Case]:
    """The cases of a MONAI datalist JSON ``{"training": [{"image": ..., "label": ...}]}`` (paths relative to it).

    Raises:
        FileNotFoundError: the datalist or a file it lists does not exist.
        ValueError: no ``training`` entries.
    """
    dl = Path(path)
    if not dl.is_file():
        raise FileNotFoundError(f"Datalist {str(dl)!r} does not exist.")
    entries = json.loads(dl.read_text()).get("training")
    if not entries:
        raise ValueError(f"Datalist {str(dl)!r} has no 'training' entries.")
    out = []
    for e in entries:
        imgs = e["image"] if isinstance(e["image"], list) else [e["image"]]
        label = (dl.parent / e["label"]).resolve()
        case = Case(_strip_nifti(label.name) or label.name, tuple((dl.parent / i).resolve() for i in imgs), label)
        for p in (*case.images, case.label):
            if not p.is_file():
                raise FileNotFoundError(
                    f"{str(dl)!r} lists {str(p)!r} for case {case.name!r}, but the file does not exist."
                )
        out.append(case)
    return out


# ------------------------------------------------------------------------------------------ reading
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


# ------------------------------------------------------------------------------------------ dataset.json
def _read_dataset_json(folder: str | os.PathLike) -> tuple[Path, dict[str, Any]] | None:
    path = Path(folder) / "dataset.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetJsonError(f"{str(path)!r} is not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise DatasetJsonError(f"{str(path)!r} must hold a JSON object, got {type(meta).__name__}.")
    return path, meta


def read_dataset_labels(folder: str | os.PathLike) -> dict[int, str] | None:
    """``{label value: class name}`` (sorted by value) from ``folder/dataset.json``; ``None`` without one.

    Reads MSD ``{"0": "background", "1": "Anterior"}`` and nnU-Net v2 ``{"background": 0, "Anterior": 1}``.

    Raises:
        DatasetJsonError: invalid JSON, region-based labels (``"whole": [1, 2]``), or labels that are neither
            layout (the message names the file and says to set ``[data].label_values``).
    """
    found = _read_dataset_json(folder)
    if found is None:
        return None
    path, meta = found
    labels = meta.get("labels")
    if labels is None:
        return None
    hint = ("Set [data].label_values (e.g. [0, 1, 2]) and [model].label_names in the training config (or "
            "label_names= / --label-names) to say which values are classes.")
    if not isinstance(labels, dict) or not labels:
        raise DatasetJsonError(f"{str(path)!r}: 'labels' must be a non-empty object, got {labels!r}. {hint}")
    regions = {k: v for k, v in labels.items() if isinstance(v, (list, tuple))}
    if regions:
        raise DatasetJsonError(
            f"{str(path)!r}: region-based labels are not supported ({regions}); duodiff needs one integer value "
            f"per class. {hint}"
        )
    if all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values()):  # v2: name -> id
        pairs = [(int(v), str(k)) for k, v in labels.items()]
    elif all(re.fullmatch(r"\d+", str(k)) and isinstance(v, str) for k, v in labels.items()):  # MSD: "id" -> name
        pairs = [(int(k), v) for k, v in labels.items()]
    else:
        raise DatasetJsonError(
            f"{str(path)!r}: 'labels' must map names to integer ids (nnU-Net v2: {{\"background\": 0, ...}}) or "
            f"ids to names (MSD: {{\"0\": \"background\", ...}}), got {labels}. {hint}"
        )
    values = [v for v, _ in pairs]
    if len(set(values)) != len(values) or min(values) < 0:
        raise DatasetJsonError(f"{str(path)!r}: label values must be distinct integers >= 0, got {labels}. {hint}")
    return dict(sorted(pairs))


def read_label_names(folder: str | os.PathLike) -> tuple[str, ...] | None:
    """Class names, background first, from ``folder/dataset.json`` whose ids are ``0..K-1``; ``None`` without one.

    Raises:
        DatasetJsonError: as :func:`read_dataset_labels`, or ids that are not ``0..K-1`` without gaps.
    """
    labels = read_dataset_labels(folder)
    if labels is None:
        return None
    if list(labels) != list(range(len(labels))):
        raise DatasetJsonError(
            f"{str(Path(folder) / 'dataset.json')!r}: label ids must be 0..{len(labels) - 1} without gaps, got "
            f"{sorted(labels)}. Remap the label files, or pass label_names / --label-names."
        )
    return tuple(labels.values())


def dataset_label_names(folder: str | os.PathLike, values: Sequence[int]) -> tuple[str, ...] | None:
    """The ``dataset.json`` names of ``values`` (e.g. ``[data].label_values``); ``None`` without a dataset.json.

    Raises:
        DatasetJsonError: a value has no name there (duodiff never invents names).
    """
    labels = read_dataset_labels(folder)
    if labels is None:
        return None
    missing = [int(v) for v in values if int(v) not in labels]
    if missing:
        raise DatasetJsonError(
            f"{str(Path(folder) / 'dataset.json')!r} names no class for label value(s) {missing} of "
            f"[data].label_values {list(values)} (its labels: {labels}). Add them there or set [model].label_names."
        )
    return tuple(labels[int(v)] for v in values)


def read_channel_names(folder: str | os.PathLike) -> tuple[str, ...] | None:
    """Image channel names from ``folder/dataset.json`` (``channel_names`` or MSD ``modality``); ``None`` if absent."""
    found = _read_dataset_json(folder)
    if found is None:
        return None
    path, meta = found
    channels = meta.get("channel_names", meta.get("modality"))
    if not isinstance(channels, dict) or not channels:
        return None
    if not all(re.fullmatch(r"\d+", str(k)) for k in channels):
        raise DatasetJsonError(f"{str(path)!r}: channel_names must map channel ids '0', '1', ... to names, got "
                               f"{channels}.")
    return tuple(str(channels[k]) for k in sorted(channels, key=lambda k: int(k)))

"""Load real or synthetic (image, label) pairs from MSD / nnU-Net folders for evaluation.

Real volumes are brought to the model's grid the way ``duodiff train`` prepares its data
(:mod:`duodiff.train.data`), so that real and synthetic images are compared on equal terms:

1. ``LoadImaged`` + ``EnsureChannelFirstd`` + ``Orientationd("RAS")`` (MONAI transforms);
   optionally ``Spacingd`` to the model's voxel spacing (``resample=True``);
2. ``ScaleIntensityRangePercentilesd``: per volume and channel, the 0.5th / 99.5th intensity
   percentiles map to 0 / 1 and values outside are clipped;
3. a crop / zero-pad to ``volume_shape`` centred on the label foreground centroid
   (:func:`duodiff.train.data.crop_or_pad`, the training crop).

A real voxel spacing different from the model's is reported as a warning when not resampled. Label
voxels cut off by the crop are counted and reported.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import keys
from ..io import NIFTI_SUFFIX

__all__ = ["PairSet", "load_pairs", "find_cases", "parse_cases", "read_label_names", "REAL_PREPROCESSING"]

#: How real volumes are prepared; copied into every report.
REAL_PREPROCESSING = (
    "Real images: reoriented to RAS{resample}, per-volume intensity normalisation to [0, 1] by clipping at the "
    "0.5th and 99.5th percentiles (monai.transforms.ScaleIntensityRangePercentilesd), then crop/zero-pad to the "
    "model's volume_shape centred on the label foreground centroid (the crop duodiff train uses)."
)


@dataclass
class PairSet:
    """A set of paired volumes on one grid.

    Attributes:
        images: float32 ``(N, C, H, W, D)`` in [0, 1].
        labels: int64 ``(N, 1, H, W, D)`` class ids.
        spacing: voxel size in mm (of the first case; see ``info["spacings"]``).
        names: case names.
        info: facts about loading (label voxels lost to cropping, spacings, source folder).
    """

    images: torch.Tensor
    labels: torch.Tensor
    spacing: tuple[float, float, float]
    names: list[str]
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.ndim != 5 or self.labels.ndim != 5 or self.labels.shape[1] != 1:
            raise ValueError(f"PairSet needs images (N, C, H, W, D) and labels (N, 1, H, W, D), got "
                             f"{tuple(self.images.shape)} and {tuple(self.labels.shape)}.")
        if self.images.shape[0] != self.labels.shape[0] or self.images.shape[2:] != self.labels.shape[2:]:
            raise ValueError(f"images {tuple(self.images.shape)} and labels {tuple(self.labels.shape)} must have the "
                             "same N and spatial sides.")
        if len(self.names) != self.images.shape[0]:
            raise ValueError(f"Got {len(self.names)} names for {self.images.shape[0]} volumes.")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, index: Sequence[int]) -> PairSet:
        idx = torch.as_tensor(list(index), dtype=torch.long)
        return PairSet(self.images[idx], self.labels[idx], self.spacing, [self.names[i] for i in idx.tolist()],
                       dict(self.info))


def _cases_from_json(text: str) -> list[str]:
    path_text, _, key = text.partition(".json:")
    path = Path(path_text + ".json") if key else Path(text)
    if not path.is_file():
        raise FileNotFoundError(f"Case list file {str(path)!r} does not exist.")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)!r} is not valid JSON: {e}") from e
    if isinstance(data, dict):
        if not key:
            raise ValueError(f"{str(path)!r} is a split with keys {sorted(data)}; name one, e.g. '{path}:test'.")
        if key not in data or not isinstance(data[key], list):
            raise ValueError(f"{str(path)!r} has no case list {key!r}; it has {sorted(data)}.")
        data = data[key]
    if not isinstance(data, list):
        raise ValueError(f"{str(path)!r} must hold a list of case names or a split dict of lists.")
    return [str(c) for c in data]


def parse_cases(cases: str | os.PathLike | Sequence[str] | None) -> list[str] | None:
    """Case names from a list, a comma-separated string, a text file (one per line, ``#`` comments) or a split JSON.

    A split JSON (``{"train": [...], "test": [...]}``, as used by ``duodiff train``) is named with its key:
    ``"split.json:test"``. ``None`` stays ``None``.
    """
    if cases is None:
        return None
    if isinstance(cases, (list, tuple)):
        names = [str(c).strip() for c in cases]
    else:
        text = str(cases)
        path = Path(text)
        if text.endswith(".json") or ".json:" in text:
            names = _cases_from_json(text)
        elif path.is_file():
            lines = [ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines()]
            names = [n for ln in lines for n in ln.replace(",", " ").split()]
        elif "," in text or not (text.endswith(".txt") or os.sep in text):
            names = [c.strip() for c in text.split(",")]
        else:
            raise FileNotFoundError(f"Case list file {text!r} does not exist. Pass a text file with one case name "
                                    "per line, a split JSON with its key ('split.json:test') or a comma-separated "
                                    "list such as 'case_001,case_002'.")
    names = [n[: -len(NIFTI_SUFFIX)] if n.endswith(NIFTI_SUFFIX) else n for n in names if n]
    if not names:
        raise ValueError(f"The case list {cases!r} is empty; name at least one case.")
    return names


def find_cases(folder: str | os.PathLike, cases: Sequence[str] | None = None) -> list[tuple[str, list[Path], Path]]:
    """``(case, [image channel files], label file)`` for each case of an MSD / nnU-Net folder, sorted by name.

    Images may be ``imagesTr/<case>.nii.gz`` or ``imagesTr/<case>_0000.nii.gz`` (+ ``_0001``, ... for more
    channels); labels are ``labelsTr/<case>.nii.gz``.
    """
    folder = Path(folder)
    images_dir, labels_dir = folder / "imagesTr", folder / "labelsTr"
    if not images_dir.is_dir() or not labels_dir.is_dir():
        raise FileNotFoundError(
            f"{str(folder)!r} must contain 'imagesTr' and 'labelsTr' folders (MSD / nnU-Net layout); "
            f"found imagesTr={images_dir.is_dir()}, labelsTr={labels_dir.is_dir()}.")
    found: dict[str, list[Path]] = {}
    for img in sorted(images_dir.glob(f"*{NIFTI_SUFFIX}")):
        if img.name.startswith("."):
            continue
        stem = img.name[: -len(NIFTI_SUFFIX)]
        if stem[-5:-4] == "_" and stem[-4:].isdigit():
            found.setdefault(stem[:-5], []).append(img)
        else:
            found.setdefault(stem, []).append(img)
    result = []
    for case in sorted(found):
        lab = labels_dir / f"{case}{NIFTI_SUFFIX}"
        if lab.is_file():
            result.append((case, sorted(found[case]), lab))
    if cases is not None:
        by_name = {c: (c, i, lab) for c, i, lab in result}
        missing = [c for c in cases if c not in by_name]
        if missing:
            raise ValueError(
                f"{len(missing)} requested case(s) have no image+label pair in {str(folder)!r}: {missing[:5]}"
                f"{'...' if len(missing) > 5 else ''}. Available e.g. {sorted(by_name)[:3]}.")
        result = [by_name[c] for c in dict.fromkeys(cases)]
    if not result:
        raise FileNotFoundError(f"No image+label pairs ('*{NIFTI_SUFFIX}' in imagesTr with a same-named file in "
                                f"labelsTr) in {str(folder)!r}.")
    return result


def read_label_names(folder: str | os.PathLike) -> tuple[str, ...] | None:
    """Class names from a folder's ``dataset.json`` (MSD ``{"0": name}`` or nnU-Net ``{name: 0}``), if present."""
    path = Path(folder) / "dataset.json"
    if not path.is_file():
        return None
    try:
        labels = json.loads(path.read_text()).get("labels")
    except (json.JSONDecodeError, AttributeError):
        return None
    if not isinstance(labels, dict) or not labels:
        return None
    try:
        if all(str(k).isdigit() for k in labels):
            pairs = sorted((int(k), str(v)) for k, v in labels.items())
        else:
            pairs = sorted((int(v), str(k)) for k, v in labels.items())
    except (TypeError, ValueError):
        return None
    if [i for i, _ in pairs] != list(range(len(pairs))):
        return None
    return tuple(n for _, n in pairs)


def load_pairs(
    folder: str | os.PathLike,
    *,
    volume_shape: Sequence[int] | None = None,
    cases: Sequence[str] | None = None,
    normalize: bool = True,
    resample_spacing: Sequence[float] | None = None,
    max_cases: int | None = None,
) -> PairSet:
    """Read an MSD / nnU-Net folder into a :class:`PairSet`.

    Args:
        folder: with ``imagesTr/`` and ``labelsTr/``.
        volume_shape: ``(H, W, D)`` to crop/pad every case to, centred on the label foreground; ``None``
            keeps the stored shape (then all cases must share it).
        cases: restrict to these case names (see :func:`parse_cases`).
        normalize: percentile-normalise images to [0, 1] (real data). With ``False`` images are read as
            stored and must already lie in [0, 1] (duodiff samples).
        resample_spacing: resample to this voxel size in mm first (``monai.transforms.Spacingd``).
        max_cases: read at most this many cases (the first by name).

    Returns:
        the pairs; ``info`` holds ``label_voxels_lost`` (by the crop), ``spacings`` and ``preprocessing``.
    """
    from monai.transforms import Compose, LoadImaged, Orientationd, ScaleIntensityRangePercentilesd, Spacingd

    from ..train.data import crop_or_pad

    both = [keys.IMAGE, keys.LABEL]
    entries = find_cases(folder, cases)
    if max_cases is not None:
        entries = entries[:max_cases]
    steps = [LoadImaged(keys=both, image_only=True, ensure_channel_first=True),
             Orientationd(keys=both, axcodes="RAS", labels=None)]
    if resample_spacing is not None:
        steps.append(Spacingd(keys=both, pixdim=[float(s) for s in resample_spacing], mode=("bilinear", "nearest")))
    load = Compose(steps)
    scale = ScaleIntensityRangePercentilesd(keys=keys.IMAGE, lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True,
                                            channel_wise=True)
    images, labels, names, spacings, lost = [], [], [], [], []
    for case, image_files, label_file in entries:
        channels = []
        for f in image_files:
            d = load({keys.IMAGE: str(f), keys.LABEL: str(label_file)})
            channels.append(d[keys.IMAGE])
        lab = d[keys.LABEL]
        if any(c.ndim != 4 or c.shape[0] != 1 for c in channels):
            raise ValueError(f"Case {case!r}: every image file must hold one 3D volume; got shapes "
                             f"{[tuple(c.shape) for c in channels]} (channel first). Store channels as _0000, _0001.")
        if lab.ndim != 4 or lab.shape[0] != 1 or channels[0].shape[1:] != lab.shape[1:]:
            raise ValueError(f"Case {case!r}: image {tuple(channels[0].shape[1:])} and label {tuple(lab.shape)} "
                             "(channel first) must be 3D volumes of the same size.")
        spacings.append(tuple(round(float(s), 6) for s in np.asarray(lab.pixdim)[:3]))
        img = torch.cat([torch.as_tensor(c) for c in channels]).float()
        if normalize:
            img = torch.as_tensor(scale({keys.IMAGE: img})[keys.IMAGE]).float()
        img_np = np.asarray(img, dtype=np.float32)
        lab_np = np.asarray(lab)
        if not np.all(np.isfinite(img_np)):
            raise ValueError(f"Case {case!r}: the image contains NaN or Inf values.")
        if not np.allclose(lab_np, np.round(lab_np)) or lab_np.min() < 0:
            raise ValueError(f"Case {case!r}: label file {label_file.name} holds non-integer or negative values; "
                             "labels must be class ids 0..K-1.")
        lab_np = np.round(lab_np).astype(np.int64)
        if volume_shape is not None:
            before = int((lab_np > 0).sum())
            img_np, lab_np, _ = crop_or_pad(img_np, lab_np, [int(s) for s in volume_shape])
            lost.append(before - int((lab_np > 0).sum()))
        images.append(torch.from_numpy(np.ascontiguousarray(img_np)))
        labels.append(torch.from_numpy(np.ascontiguousarray(lab_np)).long())
        names.append(case)
    shapes = {tuple(t.shape) for t in images}
    if len(shapes) > 1:
        raise ValueError(f"Cases in {str(folder)!r} have different shapes {sorted(shapes)[:3]}; pass volume_shape= "
                         "(the model's) to crop/pad them to one grid.")
    images_t = torch.stack(images)
    if not normalize:
        lo, hi = float(images_t.min()), float(images_t.max())
        if lo < -1e-4 or hi > 1 + 1e-4:
            raise ValueError(f"Images in {str(folder)!r} span [{lo:.4g}, {hi:.4g}] but must lie in [0, 1] (as duodiff "
                             "samples do). Normalise them (normalize=True / --normalize-synthetic).")
        images_t = images_t.clamp_(0.0, 1.0)
    resample = f", resampled to {tuple(resample_spacing)} mm" if resample_spacing is not None else ""
    info: dict[str, Any] = {"folder": str(folder), "spacings": sorted(set(spacings)),
                            "preprocessing": REAL_PREPROCESSING.format(resample=resample) if normalize
                            else "read as stored (values in [0, 1])"}
    if volume_shape is not None:
        info["label_voxels_lost"] = {"total": int(sum(lost)), "cases_affected": int(sum(v > 0 for v in lost)),
                                     "max_per_case": int(max(lost, default=0))}
    spacing = resample_spacing if resample_spacing is not None else spacings[0]
    return PairSet(images_t, torch.stack(labels), tuple(float(s) for s in spacing), names, info)

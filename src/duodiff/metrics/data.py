"""Load real or synthetic (image, label) pairs from MSD / nnU-Net folders for evaluation.

Real volumes are brought to the model's grid the way ``duodiff train`` prepares its data
(:mod:`duodiff.train.data`), so that real and synthetic images are compared on equal terms:

1. :func:`duodiff.data.folders.read_case` (the reader every duodiff command shares): RAS orientation,
   image/label grid and label checks, optionally resampling to the model's voxel spacing (``resample=True``);
2. :func:`duodiff.data.folders.normalise_intensity`: per volume and channel, the model's recorded intensity
   percentiles (``config.intensity_percentiles``; 0.5th / 99.5th for models saved before they were
   recorded) map to 0 / 1 and values outside are clipped;
3. a crop / zero-pad to ``volume_shape`` centred on the label foreground centroid
   (:func:`duodiff.data.crop.crop_or_pad`, the training crop).

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

from ..data.crop import crop_or_pad
from ..data.dataset_json import read_label_names
from ..data.layout import find_cases
from ..data.reading import DEFAULT_INTENSITY_PERCENTILES, normalise_intensity, read_case
from ..io import NIFTI_SUFFIX

__all__ = ["PairSet", "load_pairs", "find_cases", "parse_cases", "read_label_names", "REAL_PREPROCESSING"]

#: How real volumes are prepared; copied into every report.
REAL_PREPROCESSING = (
    "Real images: reoriented to RAS{resample}, per-volume intensity normalisation to [0, 1] by clipping at the "
    "{lo:g}th and {hi:g}th percentiles (duodiff.data.folders.normalise_intensity, as duodiff train does; the model's "
    "recorded intensity_percentiles), then crop/zero-pad to the model's volume_shape centred on the label foreground "
    "centroid (the crop duodiff train uses)."
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


def load_pairs(
    folder: str | os.PathLike,
    *,
    volume_shape: Sequence[int] | None = None,
    cases: Sequence[str] | None = None,
    normalize: bool = True,
    resample_spacing: Sequence[float] | None = None,
    max_cases: int | None = None,
    intensity_percentiles: Sequence[float] | None = None,
) -> PairSet:
    """Read an MSD / nnU-Net folder into a :class:`PairSet`.

    Cases are listed and read by :mod:`duodiff.data.folders` (the reader ``duodiff train`` uses), so the
    same cases are accepted and refused with the same messages.

    Args:
        folder: with ``imagesTr/`` and ``labelsTr/``.
        volume_shape: ``(H, W, D)`` to crop/pad every case to, centred on the label foreground; ``None``
            keeps the stored shape (then all cases must share it).
        cases: restrict to these case names (see :func:`parse_cases`).
        normalize: percentile-normalise images to [0, 1] (real data). With ``False`` images are read as
            stored and must already lie in [0, 1] (duodiff samples).
        resample_spacing: resample to this voxel size in mm first (``monai.transforms.Spacing``).
        max_cases: read at most this many cases (the first by name).
        intensity_percentiles: ``(lo, hi)`` percentiles of the normalisation: the model's recorded
            ``config.intensity_percentiles``; ``None``: (0.5, 99.5), the default of ``duodiff train``.

    Returns:
        the pairs; ``info`` holds ``label_voxels_lost`` (by the crop), ``spacings`` and ``preprocessing``.
    """
    percentiles = tuple(float(p) for p in (intensity_percentiles or DEFAULT_INTENSITY_PERCENTILES))
    entries = find_cases(folder, cases=cases)
    if not entries:
        raise FileNotFoundError(f"No image+label pairs in {str(folder)!r}.")
    if max_cases is not None:
        entries = entries[:max_cases]
    images, labels, names, spacings, lost = [], [], [], [], []
    for case in entries:
        pair = read_case(case, target_spacing=resample_spacing)
        spacings.append(tuple(round(float(s), 6) for s in pair.spacing))
        img_np = normalise_intensity(pair.image, percentiles, case.name) if normalize else pair.image
        lab_np = pair.label
        if volume_shape is not None:
            before = int((lab_np > 0).sum())
            img_np, lab_np, _ = crop_or_pad(img_np, lab_np, [int(s) for s in volume_shape])
            lost.append(before - int((lab_np > 0).sum()))
        images.append(torch.from_numpy(np.ascontiguousarray(img_np, dtype=np.float32)))
        labels.append(torch.from_numpy(np.ascontiguousarray(lab_np)).long())
        names.append(case.name)
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
                            "preprocessing": REAL_PREPROCESSING.format(resample=resample, lo=percentiles[0],
                                                                       hi=percentiles[1]) if normalize
                            else "read as stored (values in [0, 1])", "intensity_percentiles": list(percentiles)}
    if volume_shape is not None:
        info["label_voxels_lost"] = {"total": int(sum(lost)), "cases_affected": int(sum(v > 0 for v in lost)),
                                     "max_per_case": int(max(lost, default=0))}
    spacing = resample_spacing if resample_spacing is not None else spacings[0]
    return PairSet(images_t, torch.stack(labels), tuple(float(s) for s in spacing), names, info)

"""Listing the labelled cases of an MSD / nnU-Net v2 raw folder, or of a MONAI datalist.

Layouts (https://github.com/MIC-DKFZ/nnUNet/blob/master/documentation/dataset_format.md)::

    <folder>/imagesTr/<case>.nii.gz                  MSD: one 3D image, or one 4D image with channels last
    <folder>/imagesTr/<case>_0000.nii.gz, _0001 ...  nnU-Net v2: one 3D file per channel
    <folder>/labelsTr/<case>.nii.gz                  the label map of every case
    <folder>/dataset.json                            "labels": MSD {"0": "background", ...} or
                                                     nnU-Net v2 {"background": 0, ...}

Files may end in ``.nii.gz`` or ``.nii``; hidden files (``.x``, macOS ``._x.nii.gz``) and other files are
ignored. Every label needs an image and every image a label.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Case", "find_cases", "cases_from_datalist", "NIFTI_ENDINGS"]

#: File endings of NIfTI files in ``imagesTr`` / ``labelsTr``.
NIFTI_ENDINGS = (".nii.gz", ".nii")

_CHANNEL = re.compile(r"^(?P<name>.+)_(?P<channel>\d{4})$")


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

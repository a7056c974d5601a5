"""Read labelled NIfTI datasets (MSD / nnU-Net raw layout or a MONAI datalist) and preprocess them.

Cases are listed and read by :mod:`duodiff.data.folders`, the reader every duodiff command shares (load,
channel-first, orientation to RAS, image/label grid check, optional resampling to a target spacing). Then:
per-volume percentile clip + scale to [0, 1], labels remapped to ``0..K-1``, and a crop/pad to the model's
``volume_shape`` centred on the label foreground centroid. Bad cases (NaN/Inf, image and label on different
grids, non-integer labels, empty label) fail or are skipped with a report, never silently. Preprocessed arrays
are cached as ``.npz`` (loaded with ``allow_pickle=False``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.crop import crop_or_pad
from ..data.folders import (
    DEFAULT_INTENSITY_PERCENTILES,
    BadCaseError,
    Case,
    cases_from_datalist,
    find_cases,
    normalise_intensity,
    read_case,
    read_dataset_labels,
)
from ..io import atomic_write
from .config import DataConfig

__all__ = ["Case", "PreparedData", "find_cases", "read_split", "preprocess_case", "prepare_dataset", "load_split_cases",
           "BadCaseError", "data_summary", "foreground_loss_cases"]

logger = logging.getLogger(__name__)


def read_split(path: str | os.PathLike) -> dict[str, list[str]]:
    """Read a split JSON ``{"train": [...], "val": [...], "test": [...]}`` (case names)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"Split file {str(p)!r} does not exist.")
    split = json.loads(p.read_text())
    if not isinstance(split, dict) or "train" not in split:
        raise ValueError(f"Split file {str(p)!r} must be a JSON object with a 'train' list (and optionally val/test).")
    overlap = set(split.get("train", [])) & (set(split.get("test", [])) | set(split.get("val", [])))
    if overlap:
        raise ValueError(f"Split file {str(p)!r} puts cases in train and val/test at once: {sorted(overlap)[:5]}.")
    return {k: list(v) for k, v in split.items()}


def preprocess_case(case: Case, cfg: DataConfig, volume_shape: Sequence[int], label_values: Sequence[int]
                    ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Load and preprocess one case (read with :func:`duodiff.data.folders.read_case`, as every reader does).

    Returns:
        image float32 ``(C, *volume_shape)`` in [0, 1], label uint8 ``(1, *volume_shape)`` in ``0..K-1``, and
        a dict of facts (original shape, voxel spacing in mm after orientation/resampling, lost foreground
        fraction, and per class id present the fraction of its voxels kept by the crop/pad).

    Raises:
        BadCaseError: unreadable file, NaN/Inf, image/label on different voxel grids (shape or affine), non-integer
            label values, empty label, label values not in ``label_values``, a constant image channel.
    """
    pair = read_case(case, target_spacing=cfg.target_spacing or None)
    label = pair.label
    present = set(np.unique(label).tolist())
    unknown = sorted(present - set(label_values))
    if unknown:
        raise BadCaseError(
            f"case {case.name!r}: label values {unknown} are not in the dataset's labels {list(label_values)}."
        )
    lut = np.zeros(max(label_values) + 1, dtype=np.uint8)
    for new, old in enumerate(label_values):
        lut[old] = new
    label = lut[label]
    if not np.any(label > 0):
        raise BadCaseError(f"case {case.name!r}: the label is empty (background only).")
    image = normalise_intensity(pair.image, cfg.intensity_percentiles, case.name)
    orig_shape = tuple(int(s) for s in label.shape[1:])
    before = np.bincount(label.ravel(), minlength=len(label_values))
    image, label, lost = crop_or_pad(image, label, volume_shape)
    after = np.bincount(label.ravel(), minlength=len(label_values))
    kept = {str(c): float(after[c] / before[c]) for c in range(1, len(label_values)) if before[c] > 0}
    facts = {"shape": orig_shape, "lost_foreground": lost, "foreground_kept": kept, "spacing": list(pair.spacing)}
    return image.astype(np.float32), label.astype(np.uint8), facts


def load_split_cases(
    data_root: str | os.PathLike,
    split_file: str | os.PathLike,
    subset: str,
    volume_shape: Sequence[int],
    num_classes: int,
    *,
    target_spacing: Sequence[float] = (),
    intensity_percentiles: Sequence[float] | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The cases of one subset of a split, preprocessed exactly as training does (for benchmarks).

    Args:
        data_root: MSD / nnU-Net raw folder.
        split_file: split JSON (see :func:`read_split`); ``subset`` is one of its keys, e.g. ``"test"``.
        volume_shape: ``(H, W, D)`` of the model, the crop/pad target.
        num_classes: labels must be ids ``0..num_classes-1``.
        target_spacing: resample to this voxel size (mm) first, as a run with ``[data].target_spacing`` did.
        intensity_percentiles: the model's recorded ``intensity_percentiles`` (``pipe.config``); ``None``: the
            default (0.5, 99.5) that models saved before duodiff recorded them were trained with.

    Returns:
        images float32 ``(N, C, H, W, D)`` in [0, 1], labels uint8 ``(N, 1, H, W, D)`` in ``0..K-1`` and the
        case names, in the split's order.

    Raises:
        ValueError: ``subset`` missing or empty in the split. FileNotFoundError: the split names absent cases.
    """
    split = read_split(split_file)
    names = split.get(subset) or []
    if not names:
        raise ValueError(f"Split file {str(split_file)!r} has no {subset!r} cases; it has {sorted(split)}.")
    by_name = {c.name: c for c in find_cases(data_root)}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise FileNotFoundError(f"Split {str(split_file)!r} names cases not in {str(data_root)!r}: {missing[:5]}.")
    percentiles = DEFAULT_INTENSITY_PERCENTILES if intensity_percentiles is None else intensity_percentiles
    cfg = DataConfig(root=str(data_root), target_spacing=tuple(float(v) for v in target_spacing),
                     intensity_percentiles=tuple(float(p) for p in percentiles))
    values = list(range(num_classes))
    images, labels = [], []
    todo = names
    if progress:
        from tqdm.auto import tqdm

        todo = tqdm(names, desc=f"preprocessing {subset}", leave=False)
    for name in todo:
        img, lab, _ = preprocess_case(by_name[name], cfg, volume_shape, values)
        images.append(img)
        labels.append(lab)
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(labels)), list(names)


@dataclass
class PreparedData:
    """Preprocessed training (and validation) arrays.

    Attributes:
        images: float32 ``(N, C, H, W, D)`` in [0, 1].
        labels: uint8 ``(N, 1, H, W, D)`` class ids.
        names: case names.
        val_images / val_labels / val_names: the validation cases (may be empty).
        report: facts per case and the skipped cases with reasons.
    """

    images: torch.Tensor
    labels: torch.Tensor
    names: list[str]
    val_images: torch.Tensor
    val_labels: torch.Tensor
    val_names: list[str]
    report: dict = field(default_factory=dict)


def _load_arrays(cases: list[Case], cfg: DataConfig, shape, label_values, progress: bool):
    from tqdm.auto import tqdm

    images, labels, names, facts, skipped = [], [], [], {}, {}
    for case in tqdm(cases, desc="preprocessing", disable=not progress, leave=False):
        try:
            img, lab, info = preprocess_case(case, cfg, shape, label_values)
        except BadCaseError as e:
            if cfg.on_bad_case == "fail":
                raise BadCaseError(f"{e} (set [data].on_bad_case = 'skip' to skip bad cases with a report)") from e
            logger.warning("skipping %s", e)
            skipped[case.name] = str(e)
            continue
        images.append(img)
        labels.append(lab)
        names.append(case.name)
        facts[case.name] = info
    return images, labels, names, facts, skipped


def prepare_dataset(
    cfg: DataConfig,
    volume_shape: Sequence[int],
    *,
    cache_dir: str | os.PathLike,
    progress: bool = True,
) -> tuple[PreparedData, list[int]]:
    """Find, split, preprocess and cache the dataset. Test cases of the split are never read.

    Returns:
        the prepared arrays and the original label values (index = new id).
    """
    cases = cases_from_datalist(cfg.datalist) if cfg.datalist else find_cases(cfg.root)
    label_values = list(cfg.label_values)
    if not label_values:
        labels = read_dataset_labels(cfg.root) if cfg.root else None
        label_values = sorted(labels or ())
        if not label_values:
            example = '{"labels": {"background": 0, "anterior": 1, "posterior": 2}}'
            if not cfg.root:
                where = "[data].datalist gives no class names"
            elif not (Path(cfg.root) / "dataset.json").is_file():
                where = f"{str(Path(cfg.root) / 'dataset.json')!r} does not exist"
            else:
                where = f"{str(Path(cfg.root) / 'dataset.json')!r} has no 'labels'"
            raise ValueError(f"Cannot infer label values: {where}. Add a dataset.json with a 'labels' object "
                             f"(nnU-Net v2 {example}, or MSD {{\"0\": \"background\", \"1\": \"anterior\"}}) "
                             "to the data folder, or set [data].label_values (e.g. [0, 1, 2]) in the config.")
    by_name = {c.name: c for c in cases}
    if cfg.split:
        split = read_split(cfg.split)
        missing = [n for n in split["train"] + split.get("val", []) if n not in by_name]
        if missing:
            raise FileNotFoundError(f"Split {cfg.split!r} names cases not in the dataset: {missing[:5]}.")
        train_cases = [by_name[n] for n in split["train"]]
        val_cases = [by_name[n] for n in split.get("val", [])]
    else:
        train_cases, val_cases = cases, []
    key = hashlib.sha256(json.dumps({
        "cfg": {k: v for k, v in cfg.to_dict().items() if k not in DataConfig.NOT_CACHED} | {"cache_dir": ""},
        "shape": list(volume_shape), "values": label_values,
        "train": [c.name for c in train_cases], "val": [c.name for c in val_cases], "v": 2,
    }, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"prepared-{key}.npz"
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            data = PreparedData(
                torch.from_numpy(z["images"]), torch.from_numpy(z["labels"]), z["names"].tolist(),
                torch.from_numpy(z["val_images"]), torch.from_numpy(z["val_labels"]), z["val_names"].tolist(),
                json.loads(str(z["report"])),
            )
        return data, label_values
    imgs, labs, names, facts, skipped = _load_arrays(train_cases, cfg, volume_shape, label_values, progress)
    if not imgs:
        raise ValueError(f"No usable training cases in {cfg.root or cfg.datalist!r} (skipped: {len(skipped)}).")
    vimgs, vlabs, vnames, vfacts, vskipped = _load_arrays(val_cases, cfg, volume_shape, label_values, progress)
    report = {"cases": facts | vfacts, "skipped": skipped | vskipped, "label_values": label_values,
              "num_train": len(names), "num_val": len(vnames)}
    shape_c = (0, imgs[0].shape[0], *volume_shape)
    data = PreparedData(
        torch.from_numpy(np.stack(imgs)), torch.from_numpy(np.stack(labs)), names,
        torch.from_numpy(np.stack(vimgs)) if vimgs else torch.zeros(shape_c),
        torch.from_numpy(np.stack(vlabs)) if vlabs else torch.zeros((0, 1, *volume_shape), dtype=torch.uint8),
        vnames, report,
    )
    cache.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(cache, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, images=data.images.numpy(), labels=data.labels.numpy(), names=np.array(names, dtype=str),
                     val_images=data.val_images.numpy(), val_labels=data.val_labels.numpy(),
                     val_names=np.array(vnames, dtype=str), report=np.array(json.dumps(report)))
    return data, label_values


def foreground_loss_cases(report: dict, threshold: float) -> dict[str, float]:
    """``{case: lost foreground fraction}`` of the prepared cases that lost more than ``threshold`` of their label
    foreground to the crop/pad (from :attr:`PreparedData.report`), worst first."""
    lost = {name: float(f.get("lost_foreground", 0.0)) for name, f in report.get("cases", {}).items()}
    return dict(sorted(((n, v) for n, v in lost.items() if v > threshold), key=lambda kv: (-kv[1], kv[0])))


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%" if x >= 0.01 or x == 0 else f"{100 * x:.1f}%"


def data_summary(report: dict, volume_shape: Sequence[int], label_names: Sequence[str] = ()) -> list[str]:
    """Human-readable lines about a prepared dataset: cases, original shapes, spacing, and per class the fraction
    of the label foreground kept after the crop/pad to ``volume_shape`` (mean and worst case)."""
    cases = report.get("cases", {})
    skipped = report.get("skipped", {})
    shape = "x".join(str(int(v)) for v in volume_shape)
    lines = [f"data: {report.get('num_train', 0)} training + {report.get('num_val', 0)} validation case(s)"
             + (f", {len(skipped)} skipped (see logs/data_report.json)" if skipped else "")
             + f"; cropped/padded to {shape} voxels"]
    shapes = np.asarray([f["shape"] for f in cases.values() if "shape" in f], dtype=float)
    if len(shapes):
        lo, hi = shapes.min(0).astype(int), shapes.max(0).astype(int)
        lines.append(f"data: original shapes {'x'.join(map(str, lo))} .. {'x'.join(map(str, hi))} voxels")
    spacings = np.asarray([f["spacing"] for f in cases.values() if "spacing" in f], dtype=float)
    if len(spacings):
        med, lo, hi = np.median(spacings, 0), spacings.min(0), spacings.max(0)
        fmt = lambda v: "x".join(f"{x:.3g}" for x in v)  # noqa: E731
        rng = "" if np.allclose(lo, hi) else f" (range {fmt(lo)} .. {fmt(hi)})"
        lines.append(f"data: spacing {fmt(med)} mm (median){rng}")
    kept: dict[str, list[float]] = {}
    for f in cases.values():
        for c, v in f.get("foreground_kept", {}).items():
            kept.setdefault(c, []).append(float(v))
    if kept:
        def name(c: str) -> str:
            i = int(c)
            return label_names[i] if i < len(label_names) else f"class {i}"

        parts = [f"{name(c)} {_pct(float(np.mean(v)))} (worst {_pct(min(v))})"
                 for c, v in sorted(kept.items(), key=lambda kv: int(kv[0]))]
        lines.append("data: label foreground kept after crop/pad, mean over cases: " + ", ".join(parts))
    elif cases:
        lost = [float(f.get("lost_foreground", 0.0)) for f in cases.values()]
        lines.append(f"data: label foreground kept after crop/pad: {_pct(1 - float(np.mean(lost)))} mean "
                     f"(worst {_pct(1 - max(lost))})")
    return lines

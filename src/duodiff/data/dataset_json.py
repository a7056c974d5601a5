"""The ``dataset.json`` of an MSD / nnU-Net v2 folder: class labels (both layouts, one parser) and channel names.

duodiff never invents class names: a label value without a name is an error that says what to set.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["DatasetJsonError", "read_dataset_labels", "read_label_names", "dataset_label_names", "read_channel_names"]


class DatasetJsonError(ValueError):
    """A ``dataset.json`` cannot be used (invalid JSON, region-based or malformed ``labels``)."""


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

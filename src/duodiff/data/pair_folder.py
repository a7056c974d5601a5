"""`PairFolderDataset`: saved (image, label) pairs as a map-style dataset with synthetic-item keys."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from .generation import as_item, check_index, check_transform
from .layout import Case, find_cases
from .reading import read_case

__all__ = ["PairFolderDataset"]

_SEED_IN_NAME = re.compile(r"_s(\d+)$")


class PairFolderDataset(Dataset):
    """Pairs written by ``duodiff sample`` / :meth:`DuoSample.save` (or any MSD / nnU-Net v2 folder), read lazily.

    Why: pre-generate once (e.g. on a GPU) and train many times, with the same item keys as generated pairs.
    Reads ``folder/imagesTr/<name>_0000.nii.gz`` (one file per channel) and ``folder/labelsTr/<name>.nii.gz``,
    sorted by name; ``"seed"`` is parsed from names ending in ``_s<seed>`` (``-1`` when a name has no seed).
    Cases are listed and read by :mod:`duodiff.data.folders`, as ``duodiff train`` reads them (reoriented to
    RAS; the item's affine is the reoriented one). ``SyntheticPairDataset.from_folder(folder)`` builds one.

    Example:
        >>> import tempfile
        >>> from duodiff.testing import tiny_pipeline
        >>> folder = tempfile.mkdtemp()
        >>> tiny_pipeline().sample(2, seed=7, num_inference_steps=2, progress=False).save(folder)
        >>> ds = PairFolderDataset(folder)
        >>> len(ds), ds[1]["seed"], ds[1]["is_synthetic"]
        (2, 8, True)

    Args:
        folder: the folder with ``imagesTr`` and ``labelsTr``.
        transform: callable applied to every item dict.

    Raises:
        FileNotFoundError: ``folder`` has no ``imagesTr``/``labelsTr`` pairs, or a label or image is unpaired.
        BadCaseError: (when an item is read) image and label on different grids, non-integer labels, NaN.
    """

    def __init__(self, folder: str | os.PathLike, *, transform: Callable[[dict[str, Any]], Any] | None = None) -> None:
        check_transform(transform)
        self._cases = find_cases(folder)
        self.folder = Path(folder)
        self.transform = transform

    @property
    def cases(self) -> list[Case]:
        """The pairs of the folder, sorted by name (:class:`~duodiff.data.folders.Case`: name, image files, label)."""
        return list(self._cases)

    @property
    def num_samples(self) -> int:
        return len(self._cases)

    def __len__(self) -> int:
        return len(self._cases)

    def __repr__(self) -> str:
        return f"PairFolderDataset(folder={str(self.folder)!r}, num_samples={self.num_samples})"

    def __getitem__(self, index: int) -> Any:
        case = self._cases[check_index(index, len(self))]
        pair = read_case(case)  # the shared checks: same grid, integer labels (never truncated), no NaN
        match = _SEED_IN_NAME.search(case.name)
        item = as_item(torch.from_numpy(pair.image), torch.from_numpy(pair.label), pair.affine,
                       int(match.group(1)) if match else -1)
        return self.transform(item) if self.transform is not None else item

    def set_epoch(self, epoch: int) -> None:
        """Accepted so training loops can call it on any dataset; saved pairs do not depend on the epoch."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}.")

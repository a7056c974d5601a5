"""The cases of an MSD / nnU-Net v2 raw folder and the labels of its ``dataset.json``: the one reader.

Every part of duodiff that reads labelled NIfTI folders (``duodiff train``, ``duodiff evaluate``,
``duodiff export``, :meth:`~duodiff.SyntheticPairDataset.from_folder` and ``duodiff preview``) lists cases
with :func:`find_cases` and reads them with :func:`read_case`, so they accept and refuse the same cases with
the same messages.

Layouts: :mod:`duodiff.data.layout` (MSD or nnU-Net v2 raw, ``.nii.gz`` or ``.nii``).

Modules: :mod:`~duodiff.data.layout` (listing: :func:`find_cases`, :func:`cases_from_datalist`),
:mod:`~duodiff.data.reading` (:func:`read_case` and its checks, :func:`normalise_intensity`) and
:mod:`~duodiff.data.dataset_json` (class and channel names).

Example:
    >>> from duodiff.data.folders import find_cases, read_case  # doctest: +SKIP
    >>> pair = read_case(find_cases("Task04_Hippocampus")[0])  # doctest: +SKIP
    >>> pair.image.shape, pair.label.dtype  # doctest: +SKIP
    ((1, 35, 51, 35), dtype('int64'))
"""

from __future__ import annotations

from .dataset_json import (
    DatasetJsonError,
    dataset_label_names,
    read_channel_names,
    read_dataset_labels,
    read_label_names,
)
from .layout import NIFTI_ENDINGS, Case, cases_from_datalist, find_cases
from .reading import (
    DEFAULT_INTENSITY_PERCENTILES,
    GEOMETRY_TOLERANCE_MM,
    BadCaseError,
    CaseData,
    check_same_grid,
    normalise_intensity,
    read_case,
)

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

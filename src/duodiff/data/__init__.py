"""Datasets and samplers for training segmentation models on real + synthetic pairs."""

from __future__ import annotations

from .mixing import (
    SCHEDULES,
    FractionSchedule,
    MixedBatchSampler,
    MixedLoader,
    mark_real,
    mix_loaders,
    register_meta_tensor_collate,
    round_half_up,
)
from .synthetic import StreamingSyntheticPairDataset, SyntheticPairDataset

__all__ = [
    "SyntheticPairDataset",
    "StreamingSyntheticPairDataset",
    "MixedBatchSampler",
    "MixedLoader",
    "mix_loaders",
    "mark_real",
    "register_meta_tensor_collate",
    "FractionSchedule",
    "SCHEDULES",
    "round_half_up",
]

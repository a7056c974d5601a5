"""Datasets and samplers for training segmentation models on real + synthetic pairs.

* datasets: :class:`SyntheticPairDataset` (map-style, ``synthetic.py``), :class:`StreamingSyntheticPairDataset`
  (endless, ``streaming.py`` over the thread pool of ``pool.py``), :class:`PairFolderDataset` (saved pairs,
  ``pair_folder.py``); the model-backed two share ``generation.py``.
* mixing: :class:`MixedBatchSampler` (``sampler.py``) and :func:`mix_loaders` (``mixing.py``, batches merged by
  ``batches.py``), with one definition of schedule progress and synthetic count (``schedule.py``).
"""

from __future__ import annotations

from .batches import register_meta_tensor_collate
from .mixing import MixedLoader, mix_loaders
from .pair_folder import PairFolderDataset
from .sampler import MixedBatchSampler, mark_real
from .schedule import SCHEDULES, FractionSchedule, round_half_up
from .streaming import StreamingSyntheticPairDataset
from .synthetic import SyntheticPairDataset

__all__ = [
    "SyntheticPairDataset",
    "StreamingSyntheticPairDataset",
    "PairFolderDataset",
    "MixedBatchSampler",
    "MixedLoader",
    "mix_loaders",
    "mark_real",
    "register_meta_tensor_collate",
    "FractionSchedule",
    "SCHEDULES",
    "round_half_up",
]

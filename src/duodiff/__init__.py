"""duodiff: paired synthetic 3D (image, label) volumes from a Duo-Diffusion model.

>>> from duodiff import DuoDiffusion
>>> pipe = DuoDiffusion.from_preset("tiny", num_classes=3)
"""

from __future__ import annotations

from ._version import __version__
from .bundled import load_bundled
from .config import (
    AutoencoderConfig,
    ConfigError,
    ControlNetConfig,
    PipelineConfig,
    SchedulerConfig,
    UNetConfig,
)
from .data import MixedBatchSampler, SyntheticPairDataset, mix_loaders
from .output import DuoSample
from .pipeline import DuoDiffusion
from .presets import PRESETS, make_config

__all__ = [
    "__version__",
    "DuoDiffusion",
    "load_bundled",
    "DuoSample",
    "PipelineConfig",
    "AutoencoderConfig",
    "UNetConfig",
    "ControlNetConfig",
    "SchedulerConfig",
    "ConfigError",
    "PRESETS",
    "make_config",
    "SyntheticPairDataset",
    "MixedBatchSampler",
    "mix_loaders",
]

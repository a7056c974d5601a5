"""duodiff: paired synthetic 3D (image, label) volumes from a Duo-Diffusion model.

>>> from duodiff import DuoDiffusion
>>> pipe = DuoDiffusion.from_preset("tiny", num_classes=3)
"""

from __future__ import annotations

__version__ = "0.1.0"

from .bundled import load_bundled  # noqa: E402
from .config import (  # noqa: E402
    AutoencoderConfig,
    ConfigError,
    ControlNetConfig,
    PipelineConfig,
    SchedulerConfig,
    UNetConfig,
)
from .data import MixedBatchSampler, SyntheticPairDataset, mix_loaders  # noqa: E402
from .output import DuoSample  # noqa: E402
from .pipeline import DuoDiffusion  # noqa: E402
from .presets import PRESETS, make_config  # noqa: E402

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

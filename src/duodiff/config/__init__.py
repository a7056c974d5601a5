"""Frozen, validated configuration dataclasses for every Duo-Diffusion component.

Every config is checked when it is built, so a bad architecture fails with a message that says
what is allowed instead of MONAI's silent crops or cryptic size mismatches. Configs round-trip
through plain dictionaries (``to_dict`` / ``from_dict``) that are stored as sorted JSON.

Example:
    >>> from duodiff.config import AutoencoderConfig
    >>> AutoencoderConfig(in_channels=3, out_channels=3, channels=(8, 16), norm_num_groups=4).downsample_factor
    2

Modules: :mod:`~duodiff.config.base` (the shared ``_Config`` base, :class:`ConfigError`),
:mod:`~duodiff.config.components` (autoencoder, UNet, ControlNet and scheduler configs) and
:mod:`~duodiff.config.pipeline` (:class:`PipelineConfig`).
"""

from __future__ import annotations

from .base import ConfigError, ConfigTypeError
from .base import _Config as _Config  # the base duodiff.train.config imports from here
from .components import AutoencoderConfig, ControlNetConfig, SchedulerConfig, UNetConfig
from .pipeline import PipelineConfig

__all__ = [
    "ConfigError",
    "ConfigTypeError",
    "AutoencoderConfig",
    "UNetConfig",
    "ControlNetConfig",
    "SchedulerConfig",
    "PipelineConfig",
]

"""Build MONAI networks from duodiff configs. No network code lives in duodiff itself."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from monai.networks.nets import AutoencoderKL, ControlNet, DiffusionModelUNet
from torch import nn

from .config import AutoencoderConfig, ControlNetConfig, PipelineConfig, UNetConfig

__all__ = ["build_autoencoder", "build_unet", "build_controlnet", "build_component", "count_parameters"]


def _monai_kwargs(cfg: AutoencoderConfig | UNetConfig, *, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """``cfg``'s fields as keyword arguments of the 3D MONAI network it describes.

    The config fields are named as MONAI's arguments, so this is the one field-to-argument mapping; a field
    MONAI does not take is a ``TypeError`` at build time, not silently dropped. ``exclude`` names fields the
    network has no argument for (a ControlNet has no ``out_channels``).
    """
    return {"spatial_dims": 3, **{f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in exclude}}


def build_autoencoder(cfg: AutoencoderConfig) -> AutoencoderKL:
    """A 3D :class:`monai.networks.nets.AutoencoderKL` from ``cfg``."""
    return AutoencoderKL(**_monai_kwargs(cfg))


def build_unet(cfg: UNetConfig) -> DiffusionModelUNet:
    """A 3D :class:`monai.networks.nets.DiffusionModelUNet` from ``cfg``."""
    return DiffusionModelUNet(**_monai_kwargs(cfg))


def build_controlnet(cfg: ControlNetConfig) -> ControlNet:
    """A 3D :class:`monai.networks.nets.ControlNet` from ``cfg`` (the image UNet's fields and the conditioning
    embedding's)."""
    return ControlNet(**_monai_kwargs(cfg, exclude=("out_channels",)))


def build_component(name: str, config: PipelineConfig) -> nn.Module:
    """Build the component called ``name`` (one of :data:`duodiff.keys.COMPONENTS`)."""
    cfg = getattr(config, name)
    if isinstance(cfg, ControlNetConfig):
        return build_controlnet(cfg)
    if isinstance(cfg, UNetConfig):
        return build_unet(cfg)
    if isinstance(cfg, AutoencoderConfig):
        return build_autoencoder(cfg)
    raise KeyError(f"{name!r} is not a network component of PipelineConfig.")


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())

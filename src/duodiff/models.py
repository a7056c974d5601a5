"""Build MONAI networks from duodiff configs. No network code lives in duodiff itself."""

from __future__ import annotations

from monai.networks.nets import AutoencoderKL, ControlNet, DiffusionModelUNet
from torch import nn

from .config import AutoencoderConfig, ControlNetConfig, PipelineConfig, UNetConfig

__all__ = ["build_autoencoder", "build_unet", "build_controlnet", "build_component", "count_parameters"]


def build_autoencoder(cfg: AutoencoderConfig) -> AutoencoderKL:
    """A 3D :class:`monai.networks.nets.AutoencoderKL` from ``cfg``."""
    return AutoencoderKL(
        spatial_dims=3,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        channels=cfg.channels,
        num_res_blocks=cfg.num_res_blocks,
        attention_levels=cfg.attention_levels,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        with_encoder_nonlocal_attn=cfg.with_encoder_nonlocal_attn,
        with_decoder_nonlocal_attn=cfg.with_decoder_nonlocal_attn,
        use_checkpoint=cfg.use_checkpoint,
        include_fc=cfg.include_fc,
    )


def _unet_kwargs(cfg: UNetConfig) -> dict:
    return dict(
        spatial_dims=3,
        in_channels=cfg.in_channels,
        channels=cfg.channels,
        num_res_blocks=cfg.num_res_blocks,
        attention_levels=cfg.attention_levels,
        norm_num_groups=cfg.norm_num_groups,
        num_head_channels=cfg.num_head_channels,
        resblock_updown=cfg.resblock_updown,
        with_conditioning=cfg.with_conditioning,
        cross_attention_dim=cfg.cross_attention_dim,
        include_fc=cfg.include_fc,
    )


def build_unet(cfg: UNetConfig) -> DiffusionModelUNet:
    """A 3D :class:`monai.networks.nets.DiffusionModelUNet` from ``cfg``."""
    return DiffusionModelUNet(out_channels=cfg.out_channels, **_unet_kwargs(cfg))


def build_controlnet(cfg: ControlNetConfig) -> ControlNet:
    """A 3D :class:`monai.networks.nets.ControlNet` from ``cfg``."""
    return ControlNet(
        conditioning_embedding_in_channels=cfg.conditioning_embedding_in_channels,
        conditioning_embedding_num_channels=cfg.conditioning_embedding_num_channels,
        **_unet_kwargs(cfg),
    )


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

"""The config of a whole Duo-Diffusion pipeline: five networks, the schedule(s) and the volume metadata.

:class:`PipelineConfig` checks that the parts fit together (channels, latent shapes, the ControlNet mirroring the
image UNet, attributes against the label UNet's conditioning); it is what ``model_index.json`` stores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from .base import ConfigError, _Config
from .components import AutoencoderConfig, ControlNetConfig, SchedulerConfig, UNetConfig

__all__ = ["PipelineConfig"]


@dataclass(frozen=True)
class PipelineConfig(_Config):
    """Everything that defines a Duo-Diffusion pipeline: five networks plus volume metadata.

    Args:
        num_classes: label classes including background (label ids are ``0..num_classes-1``).
        volume_shape: spatial shape ``(H, W, D)`` of generated volumes, in voxels.
        spacing: voxel size in mm ``(sx, sy, sz)``; written into every NIfTI affine.
        label_names: one name per class, background first.
        image_channels: channels of the generated image (1 for a single MRI sequence).
        intensity_range: what image value 0 and 1 mean, e.g. the percentiles the training data
            was normalised with; informational.
        intensity_percentiles: the per-volume intensity percentiles ``(lo, hi)`` that real training images
            were clipped at and scaled to [0, 1] by (``[data].intensity_percentiles``, recorded by
            ``duodiff train``); ``duodiff evaluate`` and the benchmarks prepare real images the same way.
            ``None``: not recorded (models saved before duodiff recorded it; (0.5, 99.5) is assumed).
        label_scale_factor / image_scale_factor: multiply encoder latents by this before diffusion
            (1 / latent std, measured after autoencoder training).
        scheduler: the noise schedule (and prediction type) the diffusion networks were trained with.
        image_scheduler: the image UNet's and ControlNet's schedule when it differs from ``scheduler`` (e.g.
            ``v_prediction`` for the image side while the label UNet predicts epsilon); ``None`` (every model
            saved before it existed): the image side uses ``scheduler``. Read it with :meth:`schedule_of`.
    """

    _name: ClassVar[str] = "PipelineConfig"

    num_classes: int
    volume_shape: tuple[int, int, int]
    label_autoencoder: AutoencoderConfig
    label_unet: UNetConfig
    image_autoencoder: AutoencoderConfig
    image_unet: UNetConfig
    image_controlnet: ControlNetConfig
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    label_names: tuple[str, ...] = ()
    image_channels: int = 1
    intensity_range: tuple[float, float] = (0.0, 1.0)
    intensity_percentiles: tuple[float, float] | None = None
    label_scale_factor: float = 1.0
    image_scale_factor: float = 1.0
    attributes: tuple[str, ...] = ()
    attribute_mean: tuple[float, ...] = ()
    attribute_std: tuple[float, ...] = ()
    image_scheduler: SchedulerConfig | None = None

    def schedule_of(self, kind: str) -> SchedulerConfig:
        """The training schedule of the ``"label"`` or ``"image"`` diffusion stage."""
        if kind == "image":
            return self.image_scheduler or self.scheduler
        if kind == "label":
            return self.scheduler
        raise ValueError(f"kind must be 'label' or 'image', got {kind!r}.")

    def validate(self) -> None:  # noqa: C901 - a flat list of checks reads best
        n = self.num_classes
        if n < 2:
            raise ConfigError(f"num_classes must be >= 2 (background + at least one class), got {n}.")
        if not self.label_names:
            object.__setattr__(self, "label_names", ("background",) + tuple(f"class_{i}" for i in range(1, n)))
        if len(self.label_names) != n:
            raise ConfigError(
                f"label_names must have num_classes={n} entries (background first), got {len(self.label_names)}: "
                f"{list(self.label_names)}."
            )
        if len(set(self.label_names)) != n:
            raise ConfigError(f"label_names must be unique, got {list(self.label_names)}.")
        if any(s <= 0 for s in self.volume_shape):
            raise ConfigError(f"volume_shape must be positive, got {self.volume_shape}.")
        if any(not math.isfinite(s) or s <= 0 for s in self.spacing):
            raise ConfigError(f"spacing must be positive finite mm values, got {self.spacing}.")
        if self.image_channels < 1:
            raise ConfigError(f"image_channels must be >= 1, got {self.image_channels}.")
        lo, hi = self.intensity_range
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ConfigError(f"intensity_range must be two finite numbers (lo, hi) with lo < hi, got {(lo, hi)}.")
        if self.intensity_percentiles is not None:
            plo, phi = self.intensity_percentiles
            if not 0 <= plo < phi <= 100:
                raise ConfigError(
                    f"intensity_percentiles must satisfy 0 <= lo < hi <= 100 (or be None), got {(plo, phi)}."
                )
        for name in ("label_scale_factor", "image_scale_factor"):
            v = getattr(self, name)
            if not math.isfinite(v) or v <= 0:
                raise ConfigError(f"{name} must be a positive finite number, got {v}.")
        lae, iae = self.label_autoencoder, self.image_autoencoder
        if lae.in_channels != n or lae.out_channels != n:
            raise ConfigError(
                f"label_autoencoder works on one-hot labels: in_channels and out_channels must equal "
                f"num_classes={n}, got {lae.in_channels} and {lae.out_channels}."
            )
        if iae.in_channels != self.image_channels or iae.out_channels != self.image_channels:
            raise ConfigError(
                f"image_autoencoder in_channels/out_channels must equal image_channels={self.image_channels}, "
                f"got {iae.in_channels}/{iae.out_channels}."
            )
        for ae_name, ae, unet_names in (
            ("label_autoencoder", lae, ("label_unet",)),
            ("image_autoencoder", iae, ("image_unet", "image_controlnet")),
        ):
            f = ae.downsample_factor
            bad = [s for s in self.volume_shape if s % f]
            if bad:
                ok = tuple(max(f, round(s / f) * f) for s in self.volume_shape)
                raise ConfigError(
                    f"volume_shape {self.volume_shape} is not divisible by {f}, the downsample factor of "
                    f"{ae_name} (channels={ae.channels}); MONAI would silently crop it. Use a shape whose "
                    f"sides are multiples of {f}, e.g. {ok}, or fewer autoencoder levels."
                )
            latent = tuple(s // f for s in self.volume_shape)
            for un in unet_names:
                unet: UNetConfig = getattr(self, un)
                if unet.in_channels != ae.latent_channels:
                    raise ConfigError(
                        f"{un}.in_channels must equal {ae_name}.latent_channels={ae.latent_channels}, "
                        f"got {unet.in_channels}."
                    )
                if un != "image_controlnet" and unet.out_channels != ae.latent_channels:
                    raise ConfigError(
                        f"{un}.out_channels must equal {ae_name}.latent_channels={ae.latent_channels}, "
                        f"got {unet.out_channels}."
                    )
                g = unet.downsample_factor
                if any(s % g for s in latent):
                    raise ConfigError(
                        f"The latent shape {latent} (volume_shape {self.volume_shape} / {f}) must be divisible "
                        f"by {g}, the downsample factor of {un} (channels={unet.channels}). Use a volume_shape "
                        f"whose sides are multiples of {f * g}, or fewer {un} levels."
                    )
        cn, iu = self.image_controlnet, self.image_unet
        for key in ("channels", "num_res_blocks", "attention_levels", "norm_num_groups", "num_head_channels",
                    "resblock_updown"):
            if getattr(cn, key) != getattr(iu, key):
                raise ConfigError(
                    f"image_controlnet.{key}={getattr(cn, key)} must match image_unet.{key}={getattr(iu, key)}: "
                    "the ControlNet's residuals are added to the UNet's blocks."
                )
        if cn.conditioning_embedding_in_channels != n:
            raise ConfigError(
                f"image_controlnet.conditioning_embedding_in_channels must equal num_classes={n} (it sees the "
                f"one-hot label map), got {cn.conditioning_embedding_in_channels}."
            )
        if cn.condition_downsample_factor != iae.downsample_factor:
            raise ConfigError(
                f"image_controlnet.conditioning_embedding_num_channels={cn.conditioning_embedding_num_channels} "
                f"downsamples the label condition by {cn.condition_downsample_factor}, but the image latent is "
                f"{iae.downsample_factor}x smaller than the volume. Give it {len(iae.channels)} entries."
            )
        if len(set(self.attributes)) != len(self.attributes):
            raise ConfigError(f"attributes must be unique, got {list(self.attributes)}.")
        if self.attributes:
            from ..attributes import attribute_names

            try:
                cols = attribute_names(self.attributes, self.label_names)
            except ValueError as e:
                raise ConfigError(str(e)) from e
            dim = self.label_unet.cross_attention_dim or 0
            if 2 * len(cols) > dim:
                raise ConfigError(
                    f"attributes {list(self.attributes)} give {len(cols)} columns and need "
                    f"label_unet.cross_attention_dim >= {2 * len(cols)}, got {self.label_unet.cross_attention_dim}."
                )
            for key in ("attribute_mean", "attribute_std"):
                got = getattr(self, key)
                if got and len(got) != len(cols):
                    raise ConfigError(f"{key} must have {len(cols)} entries ({cols}), got {len(got)}.")
        if self.attributes and not self.label_unet.with_conditioning:
            raise ConfigError(
                f"attributes {list(self.attributes)} need label_unet.with_conditioning=True and "
                "cross_attention_dim set."
            )

    @property
    def label_latent_shape(self) -> tuple[int, int, int, int]:
        """``(C, h, w, d)`` of the label latent."""
        f = self.label_autoencoder.downsample_factor
        return (self.label_autoencoder.latent_channels, *(s // f for s in self.volume_shape))  # type: ignore[return-value]

    @property
    def image_latent_shape(self) -> tuple[int, int, int, int]:
        """``(C, h, w, d)`` of the image latent."""
        f = self.image_autoencoder.downsample_factor
        return (self.image_autoencoder.latent_channels, *(s // f for s in self.volume_shape))  # type: ignore[return-value]

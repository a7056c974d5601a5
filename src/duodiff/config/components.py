"""Configs of the pipeline's parts: the autoencoders, the diffusion UNets, the ControlNet and the noise schedule.

Each builds one MONAI network (:mod:`duodiff.models`) or scheduler (:mod:`duodiff.schedulers`) and checks what
MONAI would otherwise crop silently or fail on with a cryptic size mismatch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from .base import ConfigError, _Config

__all__ = ["AutoencoderConfig", "UNetConfig", "ControlNetConfig", "SchedulerConfig"]


def _check_levels(name: str, channels: tuple[int, ...], per_level: dict[str, tuple]) -> None:
    if len(channels) < 1:
        raise ConfigError(f"{name}.channels must have at least one level, got {channels}.")
    if any(c <= 0 for c in channels):
        raise ConfigError(f"{name}.channels must be positive, got {channels}.")
    for key, values in per_level.items():
        if len(values) != len(channels):
            raise ConfigError(
                f"{name}.{key} must have one entry per level ({len(channels)} for channels={channels}), "
                f"got {values}."
            )


def _check_groups(name: str, channels: tuple[int, ...], groups: int) -> None:
    bad = [c for c in channels if c % groups] if groups > 0 else list(channels)
    if bad:
        raise ConfigError(
            f"{name}.norm_num_groups={groups} must divide every channel count, but {bad or channels} "
            f"are not divisible. Use a norm_num_groups that divides all of {channels} "
            f"(e.g. {math.gcd(*channels)})."
        )


@dataclass(frozen=True)
class AutoencoderConfig(_Config):
    """A MONAI :class:`~monai.networks.nets.AutoencoderKL` (3D).

    The autoencoder downsamples each side by ``2 ** (len(channels) - 1)``. ``include_fc=False`` drops the
    attention output projection (MONAI's ``include_fc``); checkpoints imported from MONAI Generative 0.2.3
    need it, because that version never applied the projection.
    """

    _name: ClassVar[str] = "AutoencoderConfig"

    in_channels: int
    out_channels: int
    channels: tuple[int, ...] = (32, 64, 64)
    num_res_blocks: tuple[int, ...] = (1, 1, 1)
    attention_levels: tuple[bool, ...] = (False, False, False)
    latent_channels: int = 4
    norm_num_groups: int = 32
    with_encoder_nonlocal_attn: bool = False
    with_decoder_nonlocal_attn: bool = False
    use_checkpoint: bool = False
    include_fc: bool = True

    def validate(self) -> None:
        if self.in_channels < 1 or self.out_channels < 1 or self.latent_channels < 1:
            raise ConfigError(
                f"{self._name}: in_channels, out_channels and latent_channels must be >= 1, got "
                f"{self.in_channels}, {self.out_channels}, {self.latent_channels}."
            )
        _check_levels(
            self._name,
            self.channels,
            {"num_res_blocks": self.num_res_blocks, "attention_levels": self.attention_levels},
        )
        _check_groups(self._name, self.channels, self.norm_num_groups)

    @property
    def downsample_factor(self) -> int:
        """How much each spatial side shrinks from volume to latent."""
        return 2 ** (len(self.channels) - 1)


@dataclass(frozen=True)
class UNetConfig(_Config):
    """A MONAI :class:`~monai.networks.nets.DiffusionModelUNet` (3D) working in a latent space.

    ``cross_attention_dim`` (with ``with_conditioning=True``) enables attribute conditioning.
    ``include_fc=False`` drops the self-attention output projection (MONAI's ``include_fc``), as needed
    for unconditioned checkpoints imported from MONAI Generative 0.2.3 (see :mod:`duodiff.convert`).
    """

    _name: ClassVar[str] = "UNetConfig"

    in_channels: int
    out_channels: int
    channels: tuple[int, ...] = (32, 64, 64)
    num_res_blocks: tuple[int, ...] = (1, 1, 1)
    attention_levels: tuple[bool, ...] = (False, True, True)
    norm_num_groups: int = 32
    num_head_channels: int = 16
    resblock_updown: bool = False
    with_conditioning: bool = False
    cross_attention_dim: int | None = None
    include_fc: bool = True

    def validate(self) -> None:
        _check_levels(
            self._name,
            self.channels,
            {"num_res_blocks": self.num_res_blocks, "attention_levels": self.attention_levels},
        )
        _check_groups(self._name, self.channels, self.norm_num_groups)
        if self.num_head_channels < 1:
            raise ConfigError(f"{self._name}.num_head_channels must be >= 1, got {self.num_head_channels}.")
        for c, att in zip(self.channels, self.attention_levels):
            if att and c % self.num_head_channels:
                raise ConfigError(
                    f"{self._name}.num_head_channels={self.num_head_channels} must divide the channels of "
                    f"every attention level, but level with {c} channels does not. Choose a divisor of {c}."
                )
        if self.with_conditioning != (self.cross_attention_dim is not None):
            raise ConfigError(
                f"{self._name}: with_conditioning={self.with_conditioning} needs cross_attention_dim to be "
                f"{'set' if self.with_conditioning else 'None'}, got {self.cross_attention_dim}."
            )

    @property
    def downsample_factor(self) -> int:
        """Latent sides must be divisible by this."""
        return 2 ** (len(self.channels) - 1)


@dataclass(frozen=True)
class ControlNetConfig(UNetConfig):
    """A MONAI :class:`~monai.networks.nets.ControlNet` mirroring an image UNet.

    ``conditioning_embedding_num_channels`` downsamples the condition (the one-hot label at
    image resolution) by ``2 ** (len(...) - 1)``; this must equal the image autoencoder's
    downsample factor so the condition lands at latent resolution.
    """

    _name: ClassVar[str] = "ControlNetConfig"

    conditioning_embedding_in_channels: int = 1
    conditioning_embedding_num_channels: tuple[int, ...] = (16, 32, 32)

    def validate(self) -> None:
        super().validate()
        if not self.conditioning_embedding_num_channels:
            raise ConfigError(f"{self._name}.conditioning_embedding_num_channels must not be empty.")

    @property
    def condition_downsample_factor(self) -> int:
        return 2 ** (len(self.conditioning_embedding_num_channels) - 1)


_SCHEDULES = ("linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine")
#: ``"rectified_flow"``: velocity ``x0 - noise`` on straight paths (MONAI ``RFlowScheduler``; the betas are unused).
_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "rectified_flow")


@dataclass(frozen=True)
class SchedulerConfig(_Config):
    """The noise schedule the diffusion UNets were trained with.

    Every sampler (DDPM, DDIM, ...) chosen at sample time is built from this one schedule. ``schedule`` is a
    MONAI ``NoiseSchedules`` name; ``beta_start`` / ``beta_end`` apply to the ``*_beta`` schedules and are ignored
    by ``"cosine"`` (Nichol & Dhariwal 2021, offset s = 0.008). ``prediction_type``: ``"epsilon"``,
    ``"v_prediction"`` (Salimans & Ho 2022), ``"sample"``, or ``"rectified_flow"`` (Liu et al. 2023: the UNet
    predicts the velocity ``x0 - noise`` on ``x_t = (1 - t/T) x0 + (t/T) noise``; no noise schedule, so
    ``schedule`` and the betas are unused; sampled with ``"rflow"``).
    """

    _name: ClassVar[str] = "SchedulerConfig"

    num_train_timesteps: int = 1000
    schedule: str = "scaled_linear_beta"
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    prediction_type: str = "epsilon"

    def validate(self) -> None:
        if self.num_train_timesteps < 1:
            raise ConfigError(
                f"{self._name}.num_train_timesteps must be >= 1, got {self.num_train_timesteps}."
            )
        if self.schedule not in _SCHEDULES:
            raise ConfigError(f"{self._name}.schedule must be one of {_SCHEDULES}, got {self.schedule!r}.")
        if self.prediction_type not in _PREDICTION_TYPES:
            raise ConfigError(
                f"{self._name}.prediction_type must be one of {_PREDICTION_TYPES}, got {self.prediction_type!r}."
            )
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ConfigError(
                f"{self._name}: need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}."
            )

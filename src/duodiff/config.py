"""Frozen, validated configuration dataclasses for every Duo-Diffusion component.

Every config is checked when it is built, so a bad architecture fails with a message that says
what is allowed instead of MONAI's silent crops or cryptic size mismatches. Configs round-trip
through plain dictionaries (``to_dict`` / ``from_dict``) that are stored as sorted JSON.

Example:
    >>> from duodiff.config import AutoencoderConfig
    >>> AutoencoderConfig(in_channels=3, out_channels=3, channels=(8, 16), norm_num_groups=4).downsample_factor
    2
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

__all__ = [
    "ConfigError",
    "ConfigTypeError",
    "AutoencoderConfig",
    "UNetConfig",
    "ControlNetConfig",
    "SchedulerConfig",
    "PipelineConfig",
]

T = TypeVar("T", bound="_Config")


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the field, the value and the fix."""


class ConfigTypeError(ConfigError, TypeError):
    """A configuration value has the wrong type (a ``TypeError`` and a :class:`ConfigError`: bad user input)."""


def _is_instance(value: Any, annotation: Any) -> bool:
    """Minimal runtime check for the annotations used in this module."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_is_instance(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is tuple:
        args = typing.get_args(annotation)
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_is_instance(v, args[0]) for v in value)
        return len(value) == len(args) and all(_is_instance(v, a) for v, a in zip(value, args))
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if dataclasses.is_dataclass(annotation):
        return isinstance(value, (annotation, Mapping))
    return isinstance(value, annotation)


def _coerce(value: Any, annotation: Any) -> Any:
    """Turn JSON lists into tuples and nested dicts into nested configs (after type checking)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for a in typing.get_args(annotation):
            if a is not type(None) and _is_instance(value, a):
                return _coerce(value, a)
        return value
    if origin is tuple and isinstance(value, (list, tuple)):
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0]) for v in value)
        return tuple(_coerce(v, a) for v, a in zip(value, args))
    if annotation is float and isinstance(value, int):
        return float(value)
    if dataclasses.is_dataclass(annotation) and isinstance(value, Mapping):
        return annotation.from_dict(value)
    return value


@dataclass(frozen=True)
class _Config:
    """Shared machinery: type checking, JSON-friendly dict round trip, validation hook."""

    _name: ClassVar[str] = "config"

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            annotation = hints[f.name]
            if not _is_instance(value, annotation):
                raise ConfigTypeError(
                    f"{self._name}.{f.name} must be {_describe(annotation)}, got {value!r} "
                    f"({type(value).__name__})."
                )
            try:
                coerced = _coerce(value, annotation)
            except (ConfigError, TypeError) as e:  # a nested config: say which one (two autoencoders share a class)
                raise type(e)(f"{f.name}: {e}") from e
            object.__setattr__(self, f.name, coerced)
        self.validate()

    def validate(self) -> None:  # pragma: no cover - overridden
        """Check cross-field constraints; raise :class:`ConfigError` naming the fix."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples become lists, nested configs become dicts)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            out[f.name] = _to_jsonable(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
        """Build from a dict, rejecting unknown keys by name."""
        if not isinstance(data, Mapping):
            raise ConfigTypeError(f"{cls._name} must be a mapping, got {type(data).__name__}.")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(
                f"Unknown key(s) {unknown} in {cls._name}. Allowed keys: {sorted(names)}."
            )
        required = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
        ]
        missing = [k for k in required if k not in data]
        if missing:
            raise ConfigError(f"Missing required key(s) {missing} in {cls._name}.")
        return cls(**dict(data))

    def replace(self: T, **changes: Any) -> T:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, _Config):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_to_jsonable(v) for v in value]
    return value


def _describe(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(annotation))
    if origin is tuple:
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a sequence of {_describe(args[0])}"
        return f"a sequence of {len(args)} values ({', '.join(_describe(a) for a in args)})"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


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
_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass(frozen=True)
class SchedulerConfig(_Config):
    """The noise schedule the diffusion UNets were trained with.

    Every sampler (DDPM, DDIM, ...) chosen at sample time is built from this one schedule. ``schedule`` is a
    MONAI ``NoiseSchedules`` name; ``beta_start`` / ``beta_end`` apply to the ``*_beta`` schedules and are ignored
    by ``"cosine"`` (Nichol & Dhariwal 2021, offset s = 0.008).
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
            from .attributes import attribute_names

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

"""Named Duo-Diffusion architectures.

* ``"tiny"``: for tests and docs; 16-32 voxel volumes, channels (8, 16); seconds on a CPU.
* ``"hippocampus"``: CPU-trainable, 32 x 48 x 32 voxels at 1 mm (MSD Task04 hippocampus crops). Its image side is
  the fidelity recipe of docs/training.md: a 2x-downsampling image autoencoder with 8 latent channels (trained with
  the scale-equivariance loss, :data:`duodiff.train.config.STAGE_DEFAULTS`), a 4-level image UNet and
  v-prediction for the image UNet and ControlNet.
* ``"paper"``: FOSCU liver-MRI scale, 160 x 160 x 64, channels close to MONAI's 3D LDM recipe; the recipe's levers
  that keep the latent small: 8 latent channels at 4x downsampling and a v-prediction image side.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .config import AutoencoderConfig, ConfigError, ControlNetConfig, PipelineConfig, SchedulerConfig, UNetConfig

__all__ = ["PRESETS", "OVERRIDABLE", "DERIVED_KEYS", "IMAGE_PREDICTION_TYPES", "image_prediction_type_of",
           "make_config"]

#: Components whose preset settings ``make_config(overrides=...)`` can change; the ControlNet follows ``image_unet``.
OVERRIDABLE = ("label_autoencoder", "image_autoencoder", "label_unet", "image_unet")
#: Keys derived from the data or from other components, never overridden.
DERIVED_KEYS = frozenset({"in_channels", "out_channels", "with_conditioning", "cross_attention_dim"})

PRESETS = ("tiny", "hippocampus", "paper")

_DEFAULT_SHAPES = {"tiny": (16, 16, 16), "hippocampus": (32, 48, 32), "paper": (160, 160, 64)}
#: The image side's prediction type per preset when none is given (None: the same as ``prediction_type``).
#: v-prediction (Salimans & Ho 2022) for the image side: with epsilon, DDIM's clean-latent estimate divides the
#: UNet's noise error by sqrt(alpha-bar) (~15x at t = 999) and samples of a weakly compressed latent drift.
IMAGE_PREDICTION_TYPES: dict[str, str | None] = {"tiny": None, "hippocampus": "v_prediction",
                                                 "paper": "v_prediction"}


def image_prediction_type_of(name: str, prediction_type: str, image_prediction_type: str | None = None) -> str:
    """The image side's prediction type: ``image_prediction_type`` if given, else the preset's
    (:data:`IMAGE_PREDICTION_TYPES`), else ``prediction_type``. ``name`` must be one of :data:`PRESETS`."""
    return image_prediction_type or IMAGE_PREDICTION_TYPES[name] or prediction_type


def make_config(
    name: str,
    *,
    num_classes: int,
    volume_shape: Sequence[int] | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    label_names: Sequence[str] | None = None,
    image_channels: int = 1,
    prediction_type: str = "epsilon",
    image_prediction_type: str | None = None,
    attributes: Sequence[str] = (),
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> PipelineConfig:
    """Build the :class:`PipelineConfig` of a named preset.

    Args:
        name: one of :data:`PRESETS`.
        num_classes: label classes including background.
        volume_shape: ``(H, W, D)`` in voxels; defaults to the preset's shape.
        spacing: voxel size in mm.
        label_names: one name per class, background first.
        image_channels: image channels (MRI sequences).
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"rectified_flow"``: the label UNet's, and the image
            side's unless the next argument or the preset says otherwise.
        image_prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"rectified_flow"`` for the image UNet and
            ControlNet (saved as ``PipelineConfig.image_scheduler`` when it differs from ``prediction_type``);
            ``None`` = the preset's
            (:data:`IMAGE_PREDICTION_TYPES`: ``"v_prediction"`` for ``hippocampus`` and ``paper``, the same as
            ``prediction_type`` for ``tiny``).
        attributes: names of label-generation conditions (see :mod:`duodiff.attributes`);
            empty for an unconditional label model.
        overrides: per component in :data:`OVERRIDABLE`, settings that replace the preset's (any
            :class:`~duodiff.config.AutoencoderConfig` / :class:`~duodiff.config.UNetConfig` field except the
            channel counts duodiff derives). The diffusion UNets follow their autoencoder's ``latent_channels``;
            the ControlNet copies ``image_unet`` and its conditioning embedding gets one level per image-autoencoder
            level, so it downsamples the label exactly as the autoencoder downsamples the image.

    Raises:
        ConfigError: unknown preset, component or key, or a derived key in ``overrides``.
    """
    if name not in PRESETS:
        raise ConfigError(f"Unknown preset {name!r}. Choose one of {list(PRESETS)}.")
    image_type = image_prediction_type_of(name, prediction_type, image_prediction_type)
    shape = tuple(int(s) for s in (volume_shape or _DEFAULT_SHAPES[name]))
    if len(shape) != 3:
        raise ConfigError(f"volume_shape must have 3 sides (H, W, D), got {tuple(volume_shape or ())}.")
    n = int(num_classes)
    if name == "tiny":
        ae = dict(channels=(8, 16), num_res_blocks=(1, 1), attention_levels=(False, False), latent_channels=3,
                  norm_num_groups=4)
        unet = dict(channels=(8, 16), num_res_blocks=(1, 1), attention_levels=(False, True), norm_num_groups=4,
                    num_head_channels=8)
        label_ae, label_unet = ae, unet
        cond = (8, 16)
    elif name == "hippocampus":
        label_ae = dict(channels=(16, 32, 32), num_res_blocks=(1, 1, 1), attention_levels=(False, False, False),
                        latent_channels=3, norm_num_groups=16)
        # the fidelity recipe (docs/training.md, issue 12): 2x downsampling, 8 latent channels, 4-level UNet
        ae = dict(channels=(32, 64), num_res_blocks=(1, 1), attention_levels=(False, False), latent_channels=8,
                  norm_num_groups=16)
        label_unet = dict(channels=(32, 64, 64), num_res_blocks=(1, 1, 1), attention_levels=(False, True, True),
                          norm_num_groups=16, num_head_channels=16)
        unet = dict(channels=(16, 32, 64, 64), num_res_blocks=(1, 1, 1, 1),
                    attention_levels=(False, False, True, True), norm_num_groups=16, num_head_channels=16)
        cond = (16, 32, 32)
    else:  # paper
        label_ae = dict(channels=(32, 64, 64), num_res_blocks=(1, 1, 1), attention_levels=(False, False, False),
                        latent_channels=3, norm_num_groups=32)
        ae = dict(channels=(32, 64, 64), num_res_blocks=(1, 1, 1), attention_levels=(False, False, False),
                  latent_channels=8, norm_num_groups=32)
        label_unet = dict(channels=(64, 128, 256), num_res_blocks=(2, 2, 2), attention_levels=(False, True, True),
                          norm_num_groups=32, num_head_channels=32)
        unet = label_unet
        cond = (16, 32, 64)
    comps = {"label_autoencoder": dict(label_ae), "image_autoencoder": dict(ae), "label_unet": dict(label_unet),
             "image_unet": dict(unet)}
    for comp, changes in (overrides or {}).items():
        if comp not in OVERRIDABLE:
            raise ConfigError(f"Cannot override component {comp!r}; choose from {list(OVERRIDABLE)} (the ControlNet "
                              "follows image_unet).")
        derived = sorted(set(changes) & DERIVED_KEYS)
        if derived:
            raise ConfigError(f"{comp}: {derived} are derived from the data and the other components; remove them.")
        comps[comp].update(changes)
    label_ae, ae, label_unet, unet = (comps[k] for k in OVERRIDABLE)
    # one conditioning-embedding level per image-autoencoder level (the embedding downsamples 2**(levels-1))
    levels = len(ae["channels"])
    cond = tuple(cond[min(i, len(cond) - 1)] for i in range(levels))
    cond_dim = 32 if attributes else None
    return PipelineConfig(
        num_classes=n,
        volume_shape=shape,  # type: ignore[arg-type]
        spacing=tuple(float(s) for s in spacing),  # type: ignore[arg-type]
        label_names=tuple(label_names) if label_names else (),
        image_channels=image_channels,
        attributes=tuple(attributes),
        label_autoencoder=AutoencoderConfig(in_channels=n, out_channels=n, **label_ae),
        label_unet=UNetConfig(
            in_channels=label_ae["latent_channels"], out_channels=label_ae["latent_channels"],
            with_conditioning=bool(attributes), cross_attention_dim=cond_dim, **label_unet,
        ),
        image_autoencoder=AutoencoderConfig(in_channels=image_channels, out_channels=image_channels, **ae),
        image_unet=UNetConfig(in_channels=ae["latent_channels"], out_channels=ae["latent_channels"], **unet),
        image_controlnet=ControlNetConfig(
            in_channels=ae["latent_channels"], out_channels=ae["latent_channels"],
            conditioning_embedding_in_channels=n, conditioning_embedding_num_channels=cond, **unet,
        ),
        scheduler=SchedulerConfig(prediction_type=prediction_type),
        image_scheduler=(None if image_type == prediction_type else SchedulerConfig(prediction_type=image_type)),
    )

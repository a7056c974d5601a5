"""Training configuration: a human-editable TOML file parsed into frozen, validated dataclasses.

Every option is documented in ``docs/training.md`` and in the example configs under ``examples/``.
Unknown keys are errors (a typo never silently falls back to a default).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..config import ConfigError, _Config

__all__ = ["DataConfig", "ModelConfig", "StageConfig", "TrainConfig", "load_train_config", "STAGES", "STAGE_DEFAULTS",
           "stage_config"]

#: ``[model] prediction_type`` values duodiff trains: noise-schedule objectives and rectified flow.
TRAINABLE_PREDICTION_TYPES = ("epsilon", "v_prediction", "rectified_flow")

#: Training stages in dependency order (each is also a pipeline component name).
STAGES = ("label_autoencoder", "image_autoencoder", "label_unet", "image_unet", "image_controlnet")


@dataclass(frozen=True)
class DataConfig(_Config):
    """Where the labelled NIfTI data is and how it is preprocessed.

    Args:
        root: dataset folder in MSD / nnU-Net raw layout (``dataset.json`` + ``imagesTr`` + ``labelsTr``).
        datalist: optional MONAI datalist JSON (``{"training": [{"image": ..., "label": ...}]}``), paths relative to it.
        split: optional JSON ``{"train": [case, ...], "val": [...], "test": [...]}``; only ``train`` (and ``val``
            for validation) are ever read; ``test`` cases are never loaded.
        target_spacing: resample to this spacing (mm) first; empty = keep the native spacing.
        intensity_percentiles: per-volume clip percentiles before scaling to [0, 1].
        label_values: original label values mapped to ids ``0..K-1`` (empty = the dataset.json ``labels`` keys).
        on_bad_case: ``"fail"`` (default) or ``"skip"`` (skip and report) for NaN volumes, shape mismatches,
            empty labels.
        max_foreground_loss: the fraction of a case's label foreground (any class) that may fall outside the
            ``volume_shape`` crop before the case counts as damaged (default 0.05 = 5 %). Training prints a data
            summary and one warning line per damaged case (see ``on_foreground_loss``).
        on_foreground_loss: ``"warn"`` (default: train anyway, warning per damaged case) or ``"fail"`` (refuse to
            train while any case loses more than ``max_foreground_loss``).
        cache_dir: where preprocessed arrays are cached (empty = ``<output_dir>/cache``).
    """

    _name: ClassVar[str] = "[data]"

    root: str = ""
    datalist: str = ""
    split: str = ""
    target_spacing: tuple[float, ...] = ()
    intensity_percentiles: tuple[float, float] = (0.5, 99.5)
    label_values: tuple[int, ...] = ()
    on_bad_case: str = "fail"
    max_foreground_loss: float = 0.05
    on_foreground_loss: str = "warn"
    cache_dir: str = ""

    #: options that do not change the preprocessed arrays (left out of the cache key)
    NOT_CACHED: ClassVar[tuple[str, ...]] = ("cache_dir", "max_foreground_loss", "on_foreground_loss")

    def validate(self) -> None:
        if not self.root and not self.datalist:
            raise ConfigError("[data] needs root (an MSD/nnU-Net folder) or datalist (a MONAI datalist JSON).")
        if self.on_bad_case not in ("fail", "skip"):
            raise ConfigError(f"[data].on_bad_case must be 'fail' or 'skip', got {self.on_bad_case!r}.")
        if not 0 <= self.max_foreground_loss < 1:
            raise ConfigError(f"[data].max_foreground_loss must be a fraction in [0, 1) (0.05 = 5 %), got "
                              f"{self.max_foreground_loss!r}.")
        if self.on_foreground_loss not in ("warn", "fail"):
            raise ConfigError(f"[data].on_foreground_loss must be 'warn' or 'fail', got {self.on_foreground_loss!r}.")
        lo, hi = self.intensity_percentiles
        if not 0 <= lo < hi <= 100:
            raise ConfigError(f"[data].intensity_percentiles must satisfy 0 <= lo < hi <= 100, got {(lo, hi)}.")
        if self.target_spacing and (len(self.target_spacing) != 3 or min(self.target_spacing) <= 0):
            raise ConfigError(
                f"[data].target_spacing must be 3 positive mm values or empty, got {self.target_spacing}."
            )


@dataclass(frozen=True)
class ModelConfig(_Config):
    """Which architecture to train (a preset) and its volume geometry.

    Args:
        preset: ``"tiny"``, ``"hippocampus"`` or ``"paper"``.
        volume_shape: ``(H, W, D)`` crop/pad size in voxels (empty = preset default).
        label_names: class names, background first (empty = from ``dataset.json``).
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"rectified_flow"`` (both diffusion UNets, unless
            the next key is set; rectified flow is sampled with ``scheduler="rflow"``, the default for such a model).
        image_prediction_type: the image UNet's and ControlNet's prediction type when it differs from
            ``prediction_type`` (saved as the model's ``image_scheduler``); empty = the preset's
            (:data:`duodiff.presets.IMAGE_PREDICTION_TYPES`: ``"v_prediction"`` for ``hippocampus`` and ``paper``,
            ``prediction_type`` for ``tiny``). With an
            epsilon model of a large, weakly compressed latent, DDIM's clean-sample estimate divides the noise
            error by sqrt(alpha-bar) (~15x at t = 999) and samples drift; ``"v_prediction"`` (Salimans & Ho
            2022) has no such division.
        attributes: label-LDM conditions (e.g. ``["volume"]``) for attribute-conditioned generation.
        label_autoencoder / image_autoencoder / label_unet / image_unet: tables (``[model.image_autoencoder]``)
            of settings that replace the preset's for that component, e.g. ``channels = [32, 64]`` and
            ``latent_channels = 4`` for a 2x-downsampling image latent (see :func:`duodiff.presets.make_config`).
        init_from: a saved model (folder — relative to the config file —, Hub id, or ``"bundled"`` for the packaged
            hippocampus model) whose
            ``init_components`` this run starts from, trained: their configs, weights, latent scale factors and
            (for ``label_unet``) attribute statistics are copied and their stages count as finished. Used to
            retrain one side of a model with a new recipe while keeping the other.
        init_components: components taken from ``init_from``: ``["label_autoencoder"]``, ``["label_autoencoder",
            "label_unet"]`` (the label side), the label side and ``"image_autoencoder"``, or ``["image_autoencoder",
            "image_unet", "image_controlnet"]`` (the image side: retrain the label side with a new recipe while
            keeping a trained model's images). Components not taken are built from the preset and its tables.
    """

    _name: ClassVar[str] = "[model]"

    preset: str = "hippocampus"
    volume_shape: tuple[int, ...] = ()
    label_names: tuple[str, ...] = ()
    prediction_type: str = "epsilon"
    image_prediction_type: str = ""
    attributes: tuple[str, ...] = ()
    label_autoencoder: dict = field(default_factory=dict)
    image_autoencoder: dict = field(default_factory=dict)
    label_unet: dict = field(default_factory=dict)
    image_unet: dict = field(default_factory=dict)
    init_from: str = ""
    init_components: tuple[str, ...] = ()

    def validate(self) -> None:
        import dataclasses

        allowed_init = (("label_autoencoder",), ("label_autoencoder", "label_unet"),
                        ("label_autoencoder", "label_unet", "image_autoencoder"),
                        ("image_autoencoder", "image_unet", "image_controlnet"))
        if bool(self.init_from) != bool(self.init_components) or (
            self.init_components and tuple(self.init_components) not in allowed_init
        ):
            raise ConfigError(
                f"[model].init_from={self.init_from!r} with init_components={list(self.init_components)}: set both, "
                f"with init_components one of {[list(c) for c in allowed_init]} (a label UNet needs its autoencoder; "
                "the image autoencoder comes with the whole label side, or the image UNet and ControlNet with it)."
            )
        for key in ("prediction_type", "image_prediction_type"):
            value = getattr(self, key)
            if value not in TRAINABLE_PREDICTION_TYPES and not (key == "image_prediction_type" and value == ""):
                raise ConfigError(f"[model].{key} must be one of {list(TRAINABLE_PREDICTION_TYPES)}, got {value!r}.")
        for comp in self.init_components:
            if getattr(self, comp, None):  # image_controlnet has no [model.*] table
                raise ConfigError(f"[model.{comp}] changes a component that init_components takes from "
                                  f"{self.init_from!r}; remove one of them.")

        from ..config import AutoencoderConfig, UNetConfig
        from ..presets import DERIVED_KEYS, OVERRIDABLE

        for comp in OVERRIDABLE:
            cls = AutoencoderConfig if comp.endswith("autoencoder") else UNetConfig
            allowed = {f.name for f in dataclasses.fields(cls)} - DERIVED_KEYS
            unknown = sorted(set(getattr(self, comp)) - allowed)
            if unknown:
                raise ConfigError(f"Unknown key(s) {unknown} in [model.{comp}]. Allowed keys: {sorted(allowed)}.")

    @property
    def overrides(self) -> dict[str, dict]:
        """The component tables that are set, for :func:`duodiff.presets.make_config`."""
        from ..presets import OVERRIDABLE

        return {k: dict(v) for k in OVERRIDABLE if (v := getattr(self, k))}


@dataclass(frozen=True)
class StageConfig(_Config):
    """Optimisation settings of one stage (``[stages.<name>]``).

    Args:
        steps: optimiser steps.
        batch_size: global batch size (split across DDP ranks).
        lr: peak AdamW learning rate; ``warmup_steps`` linear warm-up, then cosine decay to ``lr * min_lr_ratio``.
        weight_decay: AdamW weight decay.
        grad_clip: max gradient norm (0 disables).
        ema_decay: EMA decay of the diffusion models (0 disables; autoencoders never use EMA).
        kl_weight: KL weight of autoencoders.
        dice_weight: Dice weight of the label autoencoder (with cross-entropy).
        ssim_weight: image autoencoder: weight of a ``1 - SSIM`` reconstruction loss (MONAI ``SSIMLoss``) added
            to L1 (0 = L1 only).
        scale_equivariance_weight: image autoencoder: weight of the scale-equivariance term (the decoder maps the
            2x average-pooled latent to the 2x average-pooled image; Skorokhodov et al. 2025) that keeps the
            latent smooth enough for the diffusion model (0 = off). Patch sides must then be multiples of twice
            the autoencoder's downsampling.
        decoder_only: autoencoder stages, with ``--finetune``: train only the decoder (``post_quant_conv`` and
            ``decoder``); the encoder — and so the latent the diffusion models were trained on, and the scale
            factor — stays fixed. Sharper decoding for a model whose UNets are already trained (how Stability AI's
            ``sd-vae-ft-mse`` decoder was fine-tuned).
        latent_noise_std: autoencoder stages, used only by ``decoder_only`` fine-tunes and the decoder-noise phase
            (image autoencoder default 0.3, else 0): decoder noise augmentation — each sample's
            latent gets Gaussian noise of a level drawn from ``U(0, latent_noise_std)`` in scaled-latent units (the
            diffusion model's, where real latents have std ~1) before decoding, so the decoder learns to turn a
            diffusion model's slightly-off latents into clean images (0 = off; see
            :func:`duodiff.train.stages.latent_noise_augmentation`).
        decoder_noise_fraction: autoencoder stages: after the stage's ``steps``, train the decoder alone for
            ``round(decoder_noise_fraction * steps)`` more steps with latent noise augmentation (``latent_noise_std``,
            which must then be > 0) at peak lr ``decoder_noise_lr``, with its own checkpoints and log
            (``<stage>+decoder``); the latent and scale factor are fixed before it, so it is the decoder-only
            fine-tune of the fidelity recipe built into the stage (0 = off; the image autoencoder's default 0.2).
            A ``decoder_only`` fine-tune has no such phase (it applies ``latent_noise_std`` to all its steps).
        decoder_noise_lr: peak AdamW learning rate of the decoder-noise phase.
        patch_size: autoencoder stages: train on one random ``(H, W, D)`` crop per sample (sides multiples of the
            autoencoder's downsampling) instead of whole volumes; empty = whole volumes. Cheaper steps, the same
            whole-volume reconstruction (autoencoders are convolutional).
        adv_weight: reserved for a patch-adversarial loss (not implemented yet; must be 0).
        checkpoint_every: steps between checkpoints (0 = only at the end).
        log_every: steps between CSV rows.
        condition_dropout: probability of dropping the attribute condition (classifier-free guidance training).
        amp: autocast of this stage (``"float32"``, ``"bfloat16"``, ``"float16"``); empty = the run's ``amp``.
    """

    _name: ClassVar[str] = "[stages.*]"

    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-4
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    kl_weight: float = 1e-6
    dice_weight: float = 1.0
    ssim_weight: float = 0.0
    scale_equivariance_weight: float = 0.0
    decoder_only: bool = False
    latent_noise_std: float = 0.0
    decoder_noise_fraction: float = 0.0
    decoder_noise_lr: float = 2e-4
    patch_size: tuple[int, ...] = ()
    adv_weight: float = 0.0
    checkpoint_every: int = 500
    log_every: int = 10
    condition_dropout: float = 0.15
    amp: str = ""

    @property
    def decoder_noise_steps(self) -> int:
        """Steps of the decoder-noise phase: ``round(decoder_noise_fraction * steps)``, 0 in a decoder-only
        fine-tune."""
        return 0 if self.decoder_only else round(self.decoder_noise_fraction * self.steps)

    def validate(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{self._name}.{name} must be >= 1, got {getattr(self, name)}.")
        if self.lr <= 0:
            raise ConfigError(f"{self._name}.lr must be > 0, got {self.lr}.")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"{self._name}.ema_decay must be in [0, 1), got {self.ema_decay}.")
        if self.amp not in ("", "float32", "bfloat16", "float16"):
            raise ConfigError(f"{self._name}.amp must be '', 'float32', 'bfloat16' or 'float16', got {self.amp!r}.")
        if self.patch_size and (len(self.patch_size) != 3 or min(self.patch_size) < 1):
            raise ConfigError(f"{self._name}.patch_size must be 3 positive sides (H, W, D) or empty, got "
                              f"{self.patch_size}.")
        for name in ("ssim_weight", "scale_equivariance_weight", "latent_noise_std"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{self._name}.{name} must be >= 0, got {getattr(self, name)}.")
        if not 0 <= self.decoder_noise_fraction <= 1 or self.decoder_noise_lr <= 0:
            raise ConfigError(f"{self._name}.decoder_noise_fraction must be in [0, 1] and decoder_noise_lr > 0, got "
                              f"{self.decoder_noise_fraction} and {self.decoder_noise_lr}.")
        if self.decoder_noise_steps and self.latent_noise_std <= 0:
            raise ConfigError(
                f"{self._name}.decoder_noise_fraction = {self.decoder_noise_fraction} adds a decoder-noise phase, "
                f"which needs latent_noise_std > 0, got {self.latent_noise_std}: set latent_noise_std (the recipe: "
                f"0.3), or decoder_noise_fraction = 0 to train without the phase."
            )
        if self.adv_weight != 0:
            raise ConfigError(
                f"{self._name}.adv_weight={self.adv_weight}: the patch-adversarial loss is not implemented yet; "
                "set it to 0."
            )
        if self.warmup_steps < 0 or self.checkpoint_every < 0 or self.log_every < 1:
            raise ConfigError(
                f"{self._name}: warmup_steps and checkpoint_every must be >= 0 and log_every >= 1, got "
                f"{self.warmup_steps}, {self.checkpoint_every}, {self.log_every}."
            )


#: Per-stage defaults over :class:`StageConfig`'s: the schedule that trained the bundled hippocampus model with the
#: fidelity recipe (docs/training.md). A ``[stages.NAME]`` table replaces only the keys it sets.
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "label_autoencoder": {"steps": 1000, "lr": 5e-4},
    "image_autoencoder": {"steps": 6000, "lr": 5e-4, "scale_equivariance_weight": 0.5, "decoder_noise_fraction": 0.2,
                          "latent_noise_std": 0.3},
    "label_unet": {"steps": 8000, "batch_size": 16, "lr": 3e-4, "warmup_steps": 100},
    "image_unet": {"steps": 3000, "batch_size": 16, "lr": 3e-4, "warmup_steps": 100},
    "image_controlnet": {"steps": 6000, "batch_size": 8, "lr": 3e-4, "warmup_steps": 100},
}


def stage_config(stage: str, table: dict[str, Any] | None = None) -> StageConfig:
    """The settings of ``stage``: :data:`STAGE_DEFAULTS` for it, then the keys of its ``[stages.NAME]`` ``table``."""
    return StageConfig.from_dict({**STAGE_DEFAULTS.get(stage, {}), **(table or {})})


def _default_stages() -> dict[str, StageConfig]:
    return {s: stage_config(s) for s in STAGES}


@dataclass(frozen=True)
class TrainConfig(_Config):
    """A whole training run.

    Args:
        output_dir: run folder: ``model/`` (the pipeline, loadable after every stage), ``checkpoints/``,
            ``logs/`` (CSV + PNG curves), ``previews/``.
        seed: seeds weight init, data order and diffusion noise (no global seeding).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ... (under torchrun each rank uses its local GPU).
        amp: ``"bfloat16"`` (CPU), ``"float16"`` (CUDA, with GradScaler) or ``"float32"`` (exact).
        progress: show tqdm bars.
    """

    _name: ClassVar[str] = "train config"

    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    stages: dict = field(default_factory=_default_stages)
    output_dir: str = "runs/duodiff"
    seed: int = 0
    device: str = "cpu"
    amp: str = "float32"
    progress: bool = True

    def validate(self) -> None:
        unknown = sorted(set(self.stages) - set(STAGES))
        if unknown:
            raise ConfigError(f"Unknown stage(s) {unknown} in [stages]. Stages are {list(STAGES)}.")
        merged = {}
        for s in STAGES:
            v = self.stages.get(s)
            merged[s] = v if isinstance(v, StageConfig) else stage_config(s, v)
        object.__setattr__(self, "stages", merged)
        if self.amp not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"amp must be 'float32', 'bfloat16' or 'float16', got {self.amp!r}.")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["stages"] = {k: v.to_dict() for k, v in self.stages.items()}
        return out


def load_train_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a TOML training config; relative data paths are resolved against the config file's folder."""
    path = Path(path)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.toml"))
        inside = f" ({', '.join(found[:5])} are there)" if found else ""
        raise IsADirectoryError(f"{str(path)!r} is a folder; pass a TOML training config file{inside}. Templates: "
                                "examples/*/train.toml, e.g. examples/hippocampus/train.toml.")
    if not path.is_file():
        raise FileNotFoundError(f"No training config at {str(path)!r}. Templates: examples/*/train.toml, e.g. "
                                "examples/hippocampus/train.toml.")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{str(path)!r} is not valid TOML: {e}") from e
    raw = dict(raw)
    data = dict(raw.get("data", {}))
    for key in ("root", "datalist", "split", "cache_dir"):
        if data.get(key):
            p = Path(os.path.expandvars(str(data[key]))).expanduser()
            data[key] = str(p if p.is_absolute() else (path.parent / p).resolve())
    raw["data"] = data
    model = dict(raw.get("model", {}))
    init_from = str(model.get("init_from", ""))
    if init_from and init_from != "bundled":  # a folder next to the config (else a Hub id, left as it is)
        p = Path(os.path.expandvars(init_from)).expanduser()
        if not p.is_absolute() and (path.parent / p).is_dir():
            model["init_from"] = str((path.parent / p).resolve())
        raw["model"] = model
    if "output_dir" in raw:
        p = Path(str(raw["output_dir"])).expanduser()
        raw["output_dir"] = str(p if p.is_absolute() else (path.parent / p).resolve())
    for k, v in (overrides or {}).items():
        raw[k] = v
    return TrainConfig.from_dict(raw)

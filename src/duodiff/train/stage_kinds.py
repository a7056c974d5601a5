"""One trainer class per kind of stage, over the shared loop (:func:`duodiff.train.loop.run_stage`).

* :class:`AutoencoderStage` (``label_autoencoder``, ``image_autoencoder``): reconstruction + KL; afterwards the
  latent scale factor and the validation reconstruction.
* :class:`DiffusionStage` (``label_unet``, ``image_unet``): denoising loss on the cached, scaled latents; the
  label UNet also learns the attribute statistics it is conditioned on.
* :class:`ControlNetStage` (``image_controlnet``): a copy of the image UNet driven by the one-hot label, UNet
  frozen.

Each class builds its model wrapper and loss (:mod:`duodiff.train.stages`), runs the loop and returns the pipeline
with its trained component; the :class:`~duodiff.train.Trainer` only picks the class, through :func:`make_stage`.

Example:
    >>> from duodiff.train.stage_kinds import make_stage
    >>> make_stage("label_unet")
    DiffusionStage(side='label')
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..attributes import compute_attributes, standardise
from ..config import ConfigError
from ..pipeline import DuoDiffusion
from .config import STAGES, StageConfig
from .data import PreparedData
from .loop import run_stage
from .stages import AutoencoderStep, ControlledUNet, autoencoder_loss, diffusion_loss, encode_latents

__all__ = ["StageJob", "StageResult", "AutoencoderStage", "DiffusionStage", "ControlNetStage", "STAGE_KINDS",
           "STAGE_KIND", "make_stage", "autoencoder_inputs", "scaled_latents"]


@dataclass(frozen=True)
class StageJob:
    """What one run of a stage gets from the trainer.

    Attributes:
        stage: the stage name (``"label_autoencoder"``, ...), also the pipeline component it trains.
        run_name: the stage, or ``"<stage>+ft<steps>"`` for a fine-tune (seeds, checkpoints, log).
        pipe: the pipeline to train in; ``stage``'s component holds the starting weights.
        data: the preprocessed training and validation cases.
        config: the stage's ``[stages.<stage>]`` table.
        device: where to train.
        finetune_from: ``{"steps", "seconds"}`` behind the weights of a fine-tune, ``None`` for a fresh run.
        resume: whether the run continues from its latest checkpoint.
        checkpoint_dir: the run's checkpoint folder.
        loop: the remaining keyword arguments of :func:`~duodiff.train.loop.run_stage`.
    """

    stage: str
    run_name: str
    pipe: DuoDiffusion
    data: PreparedData
    config: StageConfig
    device: torch.device
    finetune_from: dict | None
    resume: bool
    checkpoint_dir: Path
    loop: dict[str, Any]


@dataclass(frozen=True)
class StageResult:
    """A stage's outcome: the pipeline with the trained component (on the CPU), the module this process trained
    (its own replica under DDP), whether all steps ran, and what the stage adds to ``logs/stages.json``."""

    pipe: DuoDiffusion
    trained: nn.Module
    finished: bool
    info: dict[str, Any]


def autoencoder_inputs(side: str, images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """What a ``side`` autoencoder encodes: the float32 images ``(N, C, H, W, D)``, or the uint8 labels
    ``(N, 1, H, W, D)`` as float32 one-hot ``(N, num_classes, H, W, D)``."""
    if side == "image":
        return images
    return F.one_hot(labels[:, 0].long(), num_classes).movedim(-1, 1).float()


def scaled_latents(pipe: DuoDiffusion, side: str, data: PreparedData, device: torch.device) -> torch.Tensor:
    """Float32 ``(N, C, h, w, d)`` posterior means of the training cases times the ``side`` scale factor (CPU)."""
    ae = getattr(pipe, f"{side}_autoencoder")
    x = autoencoder_inputs(side, data.images, data.labels, pipe.config.num_classes)
    return encode_latents(ae, x, device=device) * getattr(pipe.config, f"{side}_scale_factor")


@dataclass(frozen=True)
class AutoencoderStage:
    """Trains the ``side`` (``"label"`` / ``"image"``) autoencoder and sets the latent scale factor."""

    side: str
    #: whether a preview grid of samples is drawn after the stage (the pipeline can sample only after the last)
    samples_preview: ClassVar[bool] = False

    def train(self, job: StageJob) -> StageResult:
        scfg, pc, data = job.config, job.pipe.config, job.data
        ae = getattr(job.pipe, job.stage)
        ae_cfg = getattr(pc, job.stage)
        patch = tuple(scfg.patch_size) or None
        se_weight = scfg.scale_equivariance_weight if self.side == "image" else 0.0
        df = ae_cfg.downsample_factor * (2 if se_weight > 0 else 1)
        sides = patch if patch is not None else tuple(pc.volume_shape)
        if any(p % df or p > v for p, v in zip(sides, pc.volume_shape)):
            what = "patch_size" if patch is not None else "patch_size (empty: the volume_shape)"
            why = (f"twice the autoencoder's downsampling ({df}; scale_equivariance_weight > 0)"
                   if se_weight > 0 else f"the autoencoder's downsampling ({df})")
            raise ConfigError(
                f"[stages.{job.stage}].{what} {list(sides)} must fit in the volume {list(pc.volume_shape)} "
                f"and have sides divisible by {why}."
            )
        latent = pc.label_latent_shape if self.side == "label" else pc.image_latent_shape
        key = f"{self.side}_scale_factor"
        loss_kw = dict(num_classes=pc.num_classes, latent_shape=latent, kl_weight=scfg.kl_weight,
                       dice_weight=scfg.dice_weight, ssim_weight=scfg.ssim_weight, patch_size=patch,
                       downsample_factor=ae_cfg.downsample_factor)
        noise_steps = scfg.decoder_noise_steps
        if scfg.decoder_only and job.finetune_from is None:
            raise ConfigError(
                f"[stages.{job.stage}].decoder_only fine-tunes the decoder of a trained autoencoder: run it "
                f"with --finetune after the stage has finished, or set decoder_only = false."
            )
        noise_std = scfg.latent_noise_std if scfg.decoder_only else 0.0
        loss = autoencoder_loss(data.images, data.labels, kind=self.side, scale_equivariance_weight=se_weight,
                                latent_noise_std=noise_std, scale_factor=float(getattr(pc, key)), **loss_kw)
        ae, finished = self._fit(job.run_name, ae, loss, scfg, job.loop, decoder_only=scfg.decoder_only)
        x = autoencoder_inputs(self.side, data.images, data.labels, pc.num_classes)
        z = encode_latents(ae, x, device=job.device)
        # a decoder-only fine-tune keeps the latent the diffusion UNets learned, scale factor included (a
        # recomputed one can differ in the last digits, e.g. when the stage first ran under bf16 autocast)
        scale = float(getattr(pc, key)) if scfg.decoder_only else float(1.0 / z.std().clamp_min(1e-6))
        info: dict[str, Any] = {"scale_factor": scale, "latent_std": float(z.std())}
        if finished and noise_steps:
            # the decoder-noise phase: the encoder (latent, scale factor) is fixed from here on, so the
            # scale-equivariance term, which shapes the latent, is off
            loop = dict(job.loop)
            stop = loop.get("stop_after")
            loop.update(ckpt_root=job.checkpoint_dir.parent / f"{job.run_name}+decoder",
                        log_file=Path(loop["log_file"]).with_name(f"{job.run_name}+decoder.csv"),
                        stop_after=None if stop is None else max(0, stop - scfg.steps))
            phase = scfg.replace(steps=noise_steps, lr=scfg.decoder_noise_lr,
                                 warmup_steps=min(scfg.warmup_steps, noise_steps // 4))
            loss = autoencoder_loss(data.images, data.labels, kind=self.side, latent_noise_std=scfg.latent_noise_std,
                                    scale_factor=scale, **loss_kw)
            ae, finished = self._fit(f"{job.run_name}+decoder", ae, loss, phase, loop, decoder_only=True)
            info["decoder_noise_steps"] = noise_steps
        pipe = DuoDiffusion(pc.replace(**{key: scale}), job.pipe.components() | {job.stage: ae.cpu()})
        info.update(self.validate(pipe, data, job.device))
        return StageResult(pipe, ae, finished, info)

    @staticmethod
    def _fit(name: str, ae: nn.Module, loss: Any, scfg: StageConfig, loop: dict[str, Any], *,
             decoder_only: bool) -> tuple[nn.Module, bool]:
        """One run of the shared loop over ``ae`` (only its decoder with ``decoder_only``); the trained autoencoder
        and whether all steps ran."""
        if decoder_only:
            for m in (ae.encoder, ae.quant_conv_mu, ae.quant_conv_log_sigma):
                m.requires_grad_(False)
        try:
            wrapper, finished = run_stage(name, AutoencoderStep(ae), loss, scfg, use_ema=False, **loop)
        finally:
            ae.requires_grad_(True)
        return wrapper.autoencoder, finished

    @torch.inference_mode()
    def validate(self, pipe: DuoDiffusion, data: PreparedData, device: torch.device) -> dict[str, Any]:
        """Reconstruction of the validation cases (:mod:`duodiff.metrics.autoencoder`): image PSNR / SSIM / L1,
        label per-class Dice; ``{}`` without validation cases."""
        from ..metrics import image_reconstruction, label_reconstruction

        if len(data.val_names) == 0:
            return {}
        ae = getattr(pipe, f"{self.side}_autoencoder").to(device).eval()
        if self.side == "image":
            r = image_reconstruction(ae, data.val_images.to(device))
            return {"val_psnr_db": r["psnr_db"]["mean"], "val_ssim": r["ssim"]["mean"], "val_l1": r["l1"]["mean"]}
        r = label_reconstruction(ae, data.val_labels.long().to(device), num_classes=pipe.config.num_classes,
                                 label_names=pipe.config.label_names or None)
        return {"val_dice": r["dice"]}


@dataclass(frozen=True)
class DiffusionStage:
    """Trains the ``side`` diffusion UNet (EMA weights) on the cached latents of the trained autoencoder."""

    side: str
    samples_preview: ClassVar[bool] = False

    def train(self, job: StageJob) -> StageResult:
        pc, data = job.pipe.config, job.data
        latents = scaled_latents(job.pipe, self.side, data, job.device)
        info: dict[str, Any] = {}
        conditioning: dict[str, Any] = {}
        if self.side == "label" and pc.attributes:
            raw = compute_attributes(data.labels, pc.num_classes, pc.attributes)
            mean, std = raw.mean(0), raw.std(0).clamp_min(1e-3)
            pc = pc.replace(attribute_mean=tuple(mean.tolist()), attribute_std=tuple(std.tolist()))
            conditioning = dict(attributes=standardise(raw, pc.attribute_mean, pc.attribute_std),
                                context_dim=pc.label_unet.cross_attention_dim,
                                condition_dropout=job.config.condition_dropout)
            info["attribute_mean"], info["attribute_std"] = list(pc.attribute_mean), list(pc.attribute_std)
        loss = diffusion_loss(latents, pc.schedule_of(self.side), **conditioning)
        unet, finished = run_stage(job.run_name, getattr(job.pipe, job.stage), loss, job.config, use_ema=True,
                                   **job.loop)
        return StageResult(DuoDiffusion(pc, job.pipe.components() | {job.stage: unet.cpu()}), unet, finished, info)


@dataclass(frozen=True)
class ControlNetStage:
    """Trains the ControlNet (EMA weights) that feeds the frozen image UNet the one-hot label map; a fresh run
    starts from a copy of the image UNet's weights."""

    side: str = "image"
    samples_preview: ClassVar[bool] = True

    def train(self, job: StageJob) -> StageResult:
        pipe, pc = job.pipe, job.pipe.config
        latents = scaled_latents(pipe, "image", job.data, job.device)
        controlnet = pipe.image_controlnet
        if job.finetune_from is None and not (job.resume and job.checkpoint_dir.is_dir()):
            _copy_unet_weights(controlnet, pipe.image_unet)
        one_hot = autoencoder_inputs("label", job.data.images, job.data.labels, pc.num_classes)
        loss = diffusion_loss(latents, pc.schedule_of("image"), one_hot=one_hot)
        model = ControlledUNet(pipe.image_unet, controlnet)
        trained, finished = run_stage(job.run_name, model, loss, job.config, use_ema=True, **job.loop)
        out = DuoDiffusion(pc, pipe.components() | {job.stage: trained.controlnet.cpu()})
        out.image_unet.requires_grad_(True)
        return StageResult(out, trained.controlnet, finished, {})


def _copy_unet_weights(controlnet: nn.Module, unet: nn.Module) -> None:
    """Initialise ``controlnet`` from the matching tensors of ``unet`` (MONAI ``copy_model_state``, its INFO
    message silenced)."""
    from monai.networks.utils import copy_model_state

    monai_log = logging.getLogger("monai.networks.utils")  # logs "'dst' model updated: ..." at INFO
    level = monai_log.level
    monai_log.setLevel(logging.WARNING)
    try:
        copy_model_state(controlnet, unet.state_dict())
    finally:
        monai_log.setLevel(level)


#: kind of stage -> its trainer class
STAGE_KINDS: dict[str, type] = {"autoencoder": AutoencoderStage, "diffusion": DiffusionStage,
                                "controlnet": ControlNetStage}
#: stage -> ``(kind, side)``
STAGE_KIND: dict[str, tuple[str, str]] = {
    "label_autoencoder": ("autoencoder", "label"),
    "image_autoencoder": ("autoencoder", "image"),
    "label_unet": ("diffusion", "label"),
    "image_unet": ("diffusion", "image"),
    "image_controlnet": ("controlnet", "image"),
}


def make_stage(stage: str) -> AutoencoderStage | DiffusionStage | ControlNetStage:
    """The trainer of ``stage`` (one of :data:`duodiff.train.config.STAGES`)."""
    if stage not in STAGE_KIND:
        raise ValueError(f"Unknown stage {stage!r}. Stages are {list(STAGES)}.")
    kind, side = STAGE_KIND[stage]
    return STAGE_KINDS[kind](side=side)

"""`train()`: run Duo-Diffusion stages on a labelled NIfTI dataset and write a loadable pipeline folder.

After every stage ``<output_dir>/model`` is a complete pipeline (``DuoDiffusion.from_pretrained`` loads it);
stages not trained yet keep their initial weights.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import keys
from ..attributes import compute_attributes, standardise
from ..config import ConfigError
from ..data.folders import dataset_label_names
from ..distributed import init_distributed
from ..pipeline import DuoDiffusion
from ..presets import image_prediction_type_of, make_config
from .config import STAGES, TrainConfig, load_train_config
from .data import BadCaseError, PreparedData, data_summary, foreground_loss_cases, prepare_dataset
from .loop import run_stage
from .stages import AutoencoderStep, ControlledUNet, autoencoder_loss, diffusion_loss, encode_latents

__all__ = ["train", "Trainer"]

logger = logging.getLogger(__name__)

#: damaged cases named one per line before the rest are only counted (all are in logs/data_report.json)
_MAX_CASE_LINES = 20

_DEPENDS = {
    "label_unet": "label_autoencoder",
    "image_unet": "image_autoencoder",
    "image_controlnet": "image_unet",
}


class Trainer:
    """Trains the stages of one run folder; see :func:`train`."""

    def __init__(self, config: TrainConfig) -> None:
        self.cfg = config
        self.out = Path(config.output_dir)
        self.model_dir = self.out / "model"
        self.di = init_distributed(config.device)
        self.device = torch.device(self.di.device(config.device))
        if self.device.type == "cuda" and self.di.is_distributed:
            torch.cuda.set_device(self.device)
        self._data: PreparedData | None = None
        #: stage -> the module this process trained (its own replica under DDP)
        self.trained: dict[str, torch.nn.Module] = {}
        self.label_values: list[int] = []
        #: what the last :meth:`run` did: stages skipped as already finished, stages trained to the end, and
        #: ``(stage, step, steps)`` of a stage stopped early by ``stop_after`` (else ``None``)
        self.skipped: list[str] = []
        self.completed: list[str] = []
        self.stopped: tuple[str, int, int] | None = None

    @property
    def is_main(self) -> bool:
        """Whether this process is rank 0 (the one that writes logs and prints)."""
        return self.di.is_main

    # ---------------------------------------------------------------- data and pipeline
    @property
    def data(self) -> PreparedData:
        if self._data is None:
            cache = Path(self.cfg.data.cache_dir) if self.cfg.data.cache_dir else self.out / "cache"
            shape = self.cfg.model.volume_shape or make_config(self.cfg.model.preset, num_classes=2).volume_shape
            if self.di.is_main and self.cfg.progress:
                print(f"reading and preprocessing the training cases (cache: {cache}) ...", file=sys.stderr,
                      flush=True)
            self._data, self.label_values = prepare_dataset(
                self.cfg.data, shape, cache_dir=cache, progress=self.cfg.progress and self.di.is_main
            )
            if self.di.is_main:
                (self.out / "logs").mkdir(parents=True, exist_ok=True)
                (self.out / "logs" / "data_report.json").write_text(json.dumps(self._data.report, indent=2))
                for line in data_summary(self._data.report, shape, self._label_names()):
                    print(line, file=sys.stderr)
            self._check_foreground_loss(shape)
        return self._data

    def _check_foreground_loss(self, shape: Sequence[int]) -> None:
        """Warn (one line per case) or fail when cases lose more than ``[data].max_foreground_loss`` of their
        label foreground to the crop/pad."""
        d = self.cfg.data
        bad = foreground_loss_cases(self._data.report, d.max_foreground_loss)
        if not bad:
            return
        n = len(self._data.report.get("cases", {}))
        where = "x".join(str(int(v)) for v in shape)
        fix = ("use a larger [model].volume_shape, a coarser [data].target_spacing, or fix those cases; "
               "[data].max_foreground_loss sets the threshold")
        if d.on_foreground_loss == "fail":
            worst = ", ".join(f"{k} {100 * v:.0f}%" for k, v in list(bad.items())[:5])
            raise BadCaseError(
                f"{len(bad)} of {n} case(s) lose more than {100 * d.max_foreground_loss:g}% of their label "
                f"foreground to the crop to {where} voxels (worst: {worst}); {fix}, or set "
                "[data].on_foreground_loss = 'warn' to train anyway. Details: logs/data_report.json."
            )
        if not self.di.is_main:
            return
        print(f"WARNING: {len(bad)} of {n} case(s) lose more than {100 * d.max_foreground_loss:g}% of their label "
              f"foreground to the crop to {where} voxels; {fix} (or set [data].on_foreground_loss = 'fail' to "
              "refuse such data):", file=sys.stderr)
        shown = list(bad.items())[:_MAX_CASE_LINES]
        for name, lost in shown:
            print(f"WARNING: case {name}: {100 * lost:.1f}% of the label foreground cropped away", file=sys.stderr)
        if len(bad) > len(shown):
            print(f"WARNING: ... and {len(bad) - len(shown)} more case(s), listed in "
                  f"{self.out / 'logs' / 'data_report.json'}", file=sys.stderr)

    def _label_names(self) -> tuple[str, ...]:
        """``[model].label_names``, else the dataset.json names of the label values (never invented ones)."""
        if self.cfg.model.label_names:
            return tuple(self.cfg.model.label_names)
        if self.cfg.data.root:
            return dataset_label_names(self.cfg.data.root, self.label_values) or ()
        return ()

    def load_pipeline(self) -> DuoDiffusion:
        """The run's pipeline: the saved one, or a fresh preset (weights seeded by ``seed``)."""
        m = self.cfg.model
        if (self.model_dir / keys.MODEL_INDEX).is_file():
            pipe = DuoDiffusion.from_pretrained(self.model_dir)
            saved = pipe.config.schedule_of("image").prediction_type
            wanted = image_prediction_type_of(m.preset, m.prediction_type, m.image_prediction_type or None)
            if saved != wanted:
                raise ConfigError(
                    f"The model in {str(self.model_dir)!r} has an image side trained with prediction_type "
                    f"{saved!r}, but [model] asks for {wanted!r} (image_prediction_type, else the "
                    f"{m.preset!r} preset's). Set [model] image_prediction_type = {saved!r}, or train into a new "
                    "output_dir."
                )
            return self._record_preprocessing(pipe)
        data = self.data
        pipe = DuoDiffusion.from_preset(
            m.preset, num_classes=len(self.label_values), volume_shape=tuple(data.images.shape[2:]),
            spacing=self._spacing(), label_names=self._label_names() or None, image_channels=int(data.images.shape[1]),
            prediction_type=m.prediction_type, image_prediction_type=m.image_prediction_type or None,
            attributes=m.attributes, init_seed=self.cfg.seed, overrides=m.overrides,
        )
        if m.init_from:
            pipe = self._init_from(pipe)
        return self._record_preprocessing(pipe)

    def _init_from(self, pipe: DuoDiffusion) -> DuoDiffusion:
        """``pipe`` with ``[model].init_components`` (configs, weights, scale factors, attribute statistics) taken
        from the trained model ``[model].init_from``; their stages are marked finished in ``stages.json``."""
        from ..bundled import load_bundled

        m = self.cfg.model
        src = load_bundled() if m.init_from == "bundled" else DuoDiffusion.from_pretrained(m.init_from)
        sc, pc = src.config, pipe.config
        bad = [(k, getattr(sc, k), getattr(pc, k)) for k in ("num_classes", "volume_shape", "spacing", "label_names")]
        bad = [(k, a, b) for k, a, b in bad
               if (max(abs(x - y) for x, y in zip(a, b)) > 1e-3 if k == "spacing" else a != b)]
        if bad:
            raise ValueError(
                f"[model].init_from {m.init_from!r} was trained on other data: "
                + ", ".join(f"{k} {a} there vs {b} here" for k, a, b in bad)
                + ". Use a model trained on this dataset and volume_shape."
            )
        changes: dict = {"label_autoencoder": sc.label_autoencoder, "label_scale_factor": sc.label_scale_factor}
        if "label_unet" in m.init_components:
            # the label UNet keeps the schedule it was trained with; the image side keeps this run's
            image = pc.schedule_of("image")
            changes.update(label_unet=sc.label_unet, attributes=sc.attributes, attribute_mean=sc.attribute_mean,
                           attribute_std=sc.attribute_std, scheduler=sc.scheduler,
                           image_scheduler=None if image == sc.scheduler else image)
        comps = pipe.components() | {c: getattr(src, c) for c in m.init_components}
        info = {"finished": True, "steps": 0, "seconds": 0.0, "init_from": m.init_from}
        if self.di.is_main:
            for stage in m.init_components:
                if not self._state().get(stage, {}).get("finished"):
                    self._mark(stage, info)
        return DuoDiffusion(pc.replace(**changes), comps)

    def _record_preprocessing(self, pipe: DuoDiffusion) -> DuoDiffusion:
        """``pipe`` with ``[data].intensity_percentiles`` recorded in its config (what evaluate reads back)."""
        wanted = tuple(float(p) for p in self.cfg.data.intensity_percentiles)
        got = pipe.config.intensity_percentiles
        if got is not None and tuple(got) != wanted:
            raise ValueError(
                f"The model in {str(self.model_dir)!r} was trained on images normalised with intensity percentiles "
                f"{tuple(got)}, but [data].intensity_percentiles is {wanted}. Use the same value, or train into a "
                "new output_dir."
            )
        return DuoDiffusion(pipe.config.replace(intensity_percentiles=wanted), pipe.components())

    def _spacing(self) -> tuple[float, float, float]:
        """Voxel spacing (mm) of the training volumes: ``[data].target_spacing``, else the median over the cases."""
        if self.cfg.data.target_spacing:
            return tuple(float(v) for v in self.cfg.data.target_spacing)
        found = [f["spacing"] for f in self.data.report.get("cases", {}).values() if "spacing" in f]
        if not found:  # a cache written before spacings were recorded
            logger.warning("training volumes' spacing unknown (old cache); the model records 1 x 1 x 1 mm")
            return (1.0, 1.0, 1.0)
        return tuple(float(v) for v in np.median(np.asarray(found, dtype=float), axis=0))

    def provenance(self) -> dict[str, Any]:
        """What the run's model was trained on: ``{"data", "split", "train": [case ids], "val": [case ids]}`` and,
        with ``[model].init_from``, which components came from which model (written as ``training_cases.json``)."""
        d, m = self.cfg.data, self.cfg.model
        out: dict[str, Any] = {"data": Path(d.root or d.datalist).name,
                               "split": Path(d.split).name if d.split else None,
                               "train": [str(n) for n in self.data.names],
                               "val": [str(n) for n in self.data.val_names]}
        if m.init_from:
            out["init_from"] = {"model": m.init_from if m.init_from == "bundled" else Path(m.init_from).name,
                                "components": list(m.init_components)}
        return out

    def _save(self, pipe: DuoDiffusion) -> None:
        if self.di.is_main:
            from ..hub import TRAINING_CASES, model_card, save_pipeline

            prov = self.provenance()
            taken = (f" {', '.join(prov['init_from']['components'])} were taken from {prov['init_from']['model']!r} "
                     "(see its own card for its training cases)." if "init_from" in prov else "")
            card = model_card(pipe, extra="\n".join([
                "## Training data", "",
                f"Trained with `duodiff train` on {len(prov['train'])} cases of `{prov['data']}` "
                f"({len(prov['val'])} validation cases"
                + (f", split `{prov['split']}`" if prov["split"] else "") + f"); the case ids are in "
                f"`{TRAINING_CASES}`, so the model can be tested on cases it never saw.{taken}"]))
            save_pipeline(pipe, self.model_dir, card=card,
                          extra_files={TRAINING_CASES: json.dumps(prov, indent=1) + "\n"})
        self.di.barrier()

    def _state(self) -> dict:
        f = self.out / "logs" / "stages.json"
        return json.loads(f.read_text()) if f.is_file() else {}

    def _mark(self, stage: str, info: dict) -> None:
        if not self.di.is_main:
            return
        state = self._state()
        state[stage] = info
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        (self.out / "logs" / "stages.json").write_text(json.dumps(state, indent=2, sort_keys=True))

    # ---------------------------------------------------------------- stages
    def run(self, stages: Sequence[str] | None = None, *, resume: bool = False, stop_after: int | None = None,
            finetune: bool = False) -> Path:
        todo = list(STAGES) if not stages or list(stages) == ["all"] else list(stages)
        bad = [s for s in todo if s not in STAGES]
        if bad:
            raise ValueError(f"Unknown stage(s) {bad}. Choose from {list(STAGES)} or 'all'.")
        self.out.mkdir(parents=True, exist_ok=True)
        if self.di.is_main:
            (self.out / "train_config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2, sort_keys=True))
        done = self._state()
        self.skipped, self.completed, self.stopped = [], [], None
        for stage in STAGES:
            if stage not in todo:
                continue
            if resume and done.get(stage, {}).get("finished"):
                logger.info("stage %s already finished; skipping", stage)
                self.skipped.append(stage)
                continue
            need = _DEPENDS.get(stage)
            if need and not done.get(need, {}).get("finished") and need not in todo:
                raise ValueError(f"Stage {stage!r} needs a trained {need!r} first: run `--stage {need}` (or 'all').")
            _ = self.data  # read the data (and print its summary) before announcing the stage
            if self.is_main and self.cfg.progress:  # like the progress bars: progress = false hides it
                scfg = self.cfg.stages[stage]
                what = "fine-tuning" if finetune else "training"
                again = ", from its latest checkpoint if any" if resume else ""
                print(f"stage {stage}: {what} {scfg.steps} steps (batch {scfg.batch_size}, {scfg.amp or self.cfg.amp}"
                      f"{again}) ...", file=sys.stderr, flush=True)
            finished = self._run_stage(stage, resume=resume, stop_after=stop_after, finetune=finetune)
            done = self._state()
            if not finished:
                self.stopped = (stage, int(stop_after or 0), self.cfg.stages[stage].steps)
                break
            self.completed.append(stage)
        return self.model_dir

    def _run_stage(self, stage: str, *, resume: bool, stop_after: int | None, finetune: bool = False) -> bool:
        data, cfg, scfg = self.data, self.cfg, self.cfg.stages[stage]
        pipe = self.load_pipeline()
        pc = pipe.config
        before = self._finetuned_from(stage) if finetune else None
        if before is None:
            # a (re-)run starts from the stage's initial weights, never silently from weights trained before
            fresh = DuoDiffusion.from_config(pc, init_seed=cfg.seed)
            pipe = DuoDiffusion(pc, pipe.components() | {stage: getattr(fresh, stage)})
        # a fine-tune draws new data orders and noise, and keeps its own checkpoints and log
        run_name = stage if before is None else f"{stage}+ft{before['steps']}"
        common = dict(
            num_samples=len(data.names), seed=cfg.seed, device=self.device, amp=scfg.amp or cfg.amp,
            ckpt_root=self.out / "checkpoints" / run_name, log_file=self.out / "logs" / f"{run_name}.csv",
            resume=resume, stop_after=stop_after, progress=cfg.progress,
        )
        t0 = time.perf_counter()
        info: dict = {}
        if stage in ("label_autoencoder", "image_autoencoder"):
            kind = stage.split("_")[0]
            ae = getattr(pipe, stage)
            latent = pc.label_latent_shape if kind == "label" else pc.image_latent_shape
            ae_cfg = getattr(pc, stage)
            patch = tuple(scfg.patch_size) or None
            se_weight = scfg.scale_equivariance_weight if kind == "image" else 0.0
            df = ae_cfg.downsample_factor * (2 if se_weight > 0 else 1)
            sides = patch if patch is not None else tuple(pc.volume_shape)
            if any(p % df or p > v for p, v in zip(sides, pc.volume_shape)):
                what = "patch_size" if patch is not None else "patch_size (empty: the volume_shape)"
                why = (f"twice the autoencoder's downsampling ({df}; scale_equivariance_weight > 0)"
                       if se_weight > 0 else f"the autoencoder's downsampling ({df})")
                raise ConfigError(
                    f"[stages.{stage}].{what} {list(sides)} must fit in the volume {list(pc.volume_shape)} "
                    f"and have sides divisible by {why}."
                )
            loss = autoencoder_loss(data.images, data.labels, kind=kind, num_classes=pc.num_classes,
                                    latent_shape=latent, kl_weight=scfg.kl_weight, dice_weight=scfg.dice_weight,
                                    ssim_weight=scfg.ssim_weight, patch_size=patch,
                                    downsample_factor=ae_cfg.downsample_factor,
                                    scale_equivariance_weight=se_weight)
            if scfg.decoder_only:
                if before is None:
                    raise ConfigError(
                        f"[stages.{stage}].decoder_only fine-tunes the decoder of a trained autoencoder: run it "
                        f"with --finetune after the stage has finished, or set decoder_only = false."
                    )
                frozen = [ae.encoder, ae.quant_conv_mu, ae.quant_conv_log_sigma]
                for m in frozen:
                    m.requires_grad_(False)
            try:
                wrapper, finished = run_stage(run_name, AutoencoderStep(ae), loss, scfg, use_ema=False, **common)
            finally:
                ae.requires_grad_(True)
            ae = wrapper.autoencoder
            self.trained[stage] = ae
            x = self._ae_inputs(kind, data.images, data.labels, pc.num_classes)
            z = encode_latents(ae, x, device=self.device)
            key = f"{kind}_scale_factor"
            # a decoder-only fine-tune keeps the latent the diffusion UNets learned, scale factor included (a
            # recomputed one can differ in the last digits, e.g. when the stage first ran under bf16 autocast)
            scale = float(getattr(pc, key)) if scfg.decoder_only else float(1.0 / z.std().clamp_min(1e-6))
            pipe = DuoDiffusion(pc.replace(**{key: scale}), pipe.components() | {stage: ae.cpu()})
            info.update(scale_factor=scale, latent_std=float(z.std()))
            info.update(self._validate_autoencoder(kind, pipe))
        elif stage in ("label_unet", "image_unet"):
            kind = stage.split("_")[0]
            latents = self._latents(pipe, kind)
            unet = getattr(pipe, stage)
            attr_kwargs: dict = {}
            if stage == "label_unet" and pc.attributes:
                raw = compute_attributes(data.labels, pc.num_classes, pc.attributes)
                mean, std = raw.mean(0), raw.std(0).clamp_min(1e-3)
                pc = pc.replace(attribute_mean=tuple(mean.tolist()), attribute_std=tuple(std.tolist()))
                attr_kwargs = dict(attributes=standardise(raw, pc.attribute_mean, pc.attribute_std),
                                   context_dim=pc.label_unet.cross_attention_dim,
                                   condition_dropout=scfg.condition_dropout)
                info["attribute_mean"], info["attribute_std"] = list(pc.attribute_mean), list(pc.attribute_std)
            loss = diffusion_loss(latents, pc.schedule_of(kind), **attr_kwargs)
            unet, finished = run_stage(run_name, unet, loss, scfg, use_ema=True, **common)
            self.trained[stage] = unet
            pipe = DuoDiffusion(pc, pipe.components() | {stage: unet.cpu()})
        else:  # image_controlnet
            from monai.networks.utils import copy_model_state

            latents = self._latents(pipe, "image")
            controlnet = pipe.image_controlnet
            if before is None and not (resume and (self.out / "checkpoints" / run_name).is_dir()):
                monai_log = logging.getLogger("monai.networks.utils")  # logs "'dst' model updated: ..." at INFO
                level = monai_log.level
                monai_log.setLevel(logging.WARNING)
                try:
                    copy_model_state(controlnet, pipe.image_unet.state_dict())
                finally:
                    monai_log.setLevel(level)
            one_hot = F.one_hot(data.labels[:, 0].long(), pc.num_classes).movedim(-1, 1).float()
            model = ControlledUNet(pipe.image_unet, controlnet)
            loss = diffusion_loss(latents, pc.schedule_of("image"), one_hot=one_hot)
            trained, finished = run_stage(run_name, model, loss, scfg, use_ema=True, **common)
            self.trained[stage] = trained.controlnet
            pipe = DuoDiffusion(pc, pipe.components() | {stage: trained.controlnet.cpu()})
            pipe.image_unet.requires_grad_(True)
        info.update(finished=finished, steps=scfg.steps if finished else stop_after,
                    seconds=round(time.perf_counter() - t0, 1))
        if before is not None:
            info.update(finetuned_from=before, total_steps=before["steps"] + info["steps"],
                        total_seconds=round(before["seconds"] + info["seconds"], 1))
        self._save(pipe)
        self._mark(stage, info)
        if finished and self.di.is_main:
            self._previews(stage, pipe, run_name)
        return finished

    def _finetuned_from(self, stage: str) -> dict:
        """Steps and seconds behind the weights a ``finetune`` run starts from (kept across its resumes)."""
        prev = self._state().get(stage, {})
        if "finetuned_from" in prev and not prev.get("finished"):  # an interrupted fine-tune: same starting point
            return dict(prev["finetuned_from"])
        if not prev.get("finished"):
            raise ValueError(
                f"--finetune continues a finished stage, but {stage!r} has not finished in {self.out}: "
                f"train it first (`--stage {stage}`), or drop --finetune."
            )
        return {"steps": int(prev.get("total_steps", prev.get("steps", 0))),
                "seconds": float(prev.get("total_seconds", prev.get("seconds", 0.0)))}

    @staticmethod
    def _ae_inputs(kind: str, images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        if kind == "image":
            return images
        return F.one_hot(labels[:, 0].long(), num_classes).movedim(-1, 1).float()

    def _latents(self, pipe: DuoDiffusion, kind: str) -> torch.Tensor:
        data = self.data
        ae = getattr(pipe, f"{kind}_autoencoder")
        x = self._ae_inputs(kind, data.images, data.labels, pipe.config.num_classes)
        scale = getattr(pipe.config, f"{kind}_scale_factor")
        return encode_latents(ae, x, device=self.device) * scale

    @torch.inference_mode()
    def _validate_autoencoder(self, kind: str, pipe: DuoDiffusion) -> dict:
        """Reconstruction of the validation cases (:mod:`duodiff.metrics.autoencoder`): image PSNR / SSIM / L1,
        label per-class Dice."""
        from ..metrics import image_reconstruction, label_reconstruction

        data = self.data
        if len(data.val_names) == 0:
            return {}
        ae = getattr(pipe, f"{kind}_autoencoder").to(self.device).eval()
        if kind == "image":
            r = image_reconstruction(ae, data.val_images.to(self.device))
            return {"val_psnr_db": r["psnr_db"]["mean"], "val_ssim": r["ssim"]["mean"], "val_l1": r["l1"]["mean"]}
        r = label_reconstruction(ae, data.val_labels.long().to(self.device), num_classes=pipe.config.num_classes,
                                 label_names=pipe.config.label_names or None)
        return {"val_dice": r["dice"]}

    def _previews(self, stage: str, pipe: DuoDiffusion, run_name: str) -> None:
        try:
            from ..preview import plot_pairs
        except ImportError:  # pragma: no cover
            return
        out = self.out / "previews" / f"{stage}.png"
        try:
            _plot_curve(self.out / "logs" / f"{run_name}.csv", self.out / "logs" / f"{run_name}.png")
            if stage == "image_controlnet":
                s = pipe.to(self.device).sample(4, seed=0, num_inference_steps=25, progress=False)
                plot_pairs([i[0].numpy() for i in s.images], [lab[0].numpy() for lab in s.labels], out,
                           titles=[f"seed {x}" for x in s.seeds], num_classes=pipe.config.num_classes,
                           label_names=pipe.config.label_names or None)
        except ImportError:  # matplotlib missing: previews are optional
            logger.info("matplotlib not installed; skipping previews")


def _plot_curve(csv_file: Path, png: Path) -> None:
    import csv

    from ..optional import require_matplotlib

    if not csv_file.is_file():
        return
    plt = require_matplotlib()
    with open(csv_file) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3))
    for key in rows[0]:
        if key in ("step", "lr", "seconds", "skipped_steps"):
            continue
        ax.plot(steps, [float(r[key]) for r in rows], label=key)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(csv_file.stem)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def train(
    config: TrainConfig | str | os.PathLike,
    *,
    stages: Sequence[str] | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    finetune: bool = False,
) -> Path:
    """Train the given stages (default all, in order) and return the pipeline folder.

    Args:
        config: a :class:`TrainConfig` or the path of a TOML config.
        stages: subset of :data:`duodiff.train.config.STAGES`, or ``None``/``["all"]``.
        resume: continue from the latest checkpoint of each unfinished stage; finished stages are skipped.
        stop_after: stop a stage after this many total steps (time-boxed runs, tests); resume later.
        finetune: train finished stages further from their current weights in ``<output_dir>/model`` (fresh
            optimiser, warm-up and cosine schedule over the stage's ``steps``); ``logs/stages.json`` records
            ``finetuned_from`` and the ``total_steps`` / ``total_seconds``. Without it a stage always starts
            from its initial weights (the ControlNet from a copy of the image UNet).

    Example:
        >>> from duodiff.train import train
        >>> model_dir = train("examples/hippocampus/train.toml")  # doctest: +SKIP
        >>> pipe = DuoDiffusion.from_pretrained(model_dir)  # doctest: +SKIP
    """
    if not isinstance(config, TrainConfig):
        config = load_train_config(config)
    return Trainer(config).run(stages, resume=resume, stop_after=stop_after, finetune=finetune)

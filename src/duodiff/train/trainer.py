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

from .. import keys
from ..config import ConfigError
from ..data.folders import dataset_label_names
from ..distributed import init_distributed
from ..pipeline import DuoDiffusion
from ..presets import image_prediction_type_of, make_config
from .config import STAGES, TrainConfig, load_train_config
from .data import BadCaseError, PreparedData, data_summary, foreground_loss_cases, prepare_dataset
from .previews import write_previews
from .stage_kinds import StageJob, make_stage

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
    """Trains the stages of one run folder; see :func:`train`.

    Under ``torchrun`` it joins (or creates) the process group; use it as a context manager, or call
    :meth:`close`, so that a group it created is destroyed before the interpreter exits (a ``gloo`` group torn
    down during interpreter shutdown can abort the process with SIGABRT after training finished).
    """

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

    def close(self) -> None:
        """Destroy the process group if this trainer created it (a no-op for a single process)."""
        self.di.close()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
            saved_label = pipe.config.schedule_of("label").prediction_type
            if saved_label != m.prediction_type:
                raise ConfigError(
                    f"The model in {str(self.model_dir)!r} has a label side trained with prediction_type "
                    f"{saved_label!r}, but [model] prediction_type is {m.prediction_type!r}; training on would "
                    f"silently keep {saved_label!r}. Set [model] prediction_type = {saved_label!r}, or train into a "
                    "new output_dir."
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
        changes: dict = {}
        if "label_autoencoder" in m.init_components:
            changes.update(label_autoencoder=sc.label_autoencoder, label_scale_factor=sc.label_scale_factor)
        if "label_unet" in m.init_components:
            # the label UNet keeps the schedule it was trained with; the image side keeps this run's
            image = pc.schedule_of("image")
            changes.update(label_unet=sc.label_unet, attributes=sc.attributes, attribute_mean=sc.attribute_mean,
                           attribute_std=sc.attribute_std, scheduler=sc.scheduler,
                           image_scheduler=None if image == sc.scheduler else image)
        if "image_autoencoder" in m.init_components:
            # the image UNet and ControlNet of this run are built on the taken latent, normalised as it was trained
            wanted = tuple(float(v) for v in self.cfg.data.intensity_percentiles)
            got = tuple(sc.intensity_percentiles) if sc.intensity_percentiles is not None else (0.5, 99.5)
            if got != wanted:
                raise ValueError(
                    f"[model].init_from {m.init_from!r} has an image autoencoder trained on images normalised with "
                    f"intensity percentiles {got}, but [data].intensity_percentiles is {wanted}. Use {list(got)}."
                )
            if "image_unet" in m.init_components:
                # the whole image side: its networks and the schedule they were trained with; the label UNet keeps
                # this run's
                image, label = sc.schedule_of("image"), pc.schedule_of("label")
                if image.prediction_type != pc.schedule_of("image").prediction_type:
                    raise ValueError(
                        f"[model].init_from {m.init_from!r} has an image side trained with prediction_type "
                        f"{image.prediction_type!r}, but [model] asks for {pc.schedule_of('image').prediction_type!r} "
                        f"(image_prediction_type, else the preset's). Set [model] image_prediction_type = "
                        f"{image.prediction_type!r}."
                    )
                changes.update(image_autoencoder=sc.image_autoencoder, image_unet=sc.image_unet,
                               image_controlnet=sc.image_controlnet, scheduler=label,
                               image_scheduler=None if image == label else image)
            elif sc.image_autoencoder != pc.image_autoencoder:  # this run's image UNet / ControlNet are built for it
                raise ValueError(
                    f"[model].init_from {m.init_from!r} has another image autoencoder ({sc.image_autoencoder}) than "
                    f"this run's preset builds ({pc.image_autoencoder}). Use the preset that model was trained with."
                )
            changes.update(image_scale_factor=sc.image_scale_factor)
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
            taken = need in self.cfg.model.init_components  # comes trained from [model].init_from
            if need and not done.get(need, {}).get("finished") and need not in todo and not taken:
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
        cfg, scfg = self.cfg, self.cfg.stages[stage]
        pipe = self.load_pipeline()
        before = self._finetuned_from(stage) if finetune else None
        if before is None:
            # a (re-)run starts from the stage's initial weights, never silently from weights trained before
            fresh = DuoDiffusion.from_config(pipe.config, init_seed=cfg.seed)
            pipe = DuoDiffusion(pipe.config, pipe.components() | {stage: getattr(fresh, stage)})
        # a fine-tune draws new data orders and noise, and keeps its own checkpoints and log
        run_name = stage if before is None else f"{stage}+ft{before['steps']}"
        ckpt_root = self.out / "checkpoints" / run_name
        loop = dict(num_samples=len(self.data.names), seed=cfg.seed, device=self.device, amp=scfg.amp or cfg.amp,
                    ckpt_root=ckpt_root, log_file=self.out / "logs" / f"{run_name}.csv", resume=resume,
                    stop_after=stop_after, progress=cfg.progress)
        job = StageJob(stage=stage, run_name=run_name, pipe=pipe, data=self.data, config=scfg, device=self.device,
                       finetune_from=before, resume=resume, checkpoint_dir=ckpt_root, loop=loop)
        t0 = time.perf_counter()
        kind = make_stage(stage)
        result = kind.train(job)
        self.trained[stage] = result.trained
        info = dict(result.info)
        info.update(finished=result.finished, steps=scfg.steps if result.finished else stop_after,
                    seconds=round(time.perf_counter() - t0, 1))
        if before is not None:
            info.update(finetuned_from=before, total_steps=before["steps"] + info["steps"],
                        total_seconds=round(before["seconds"] + info["seconds"], 1))
        self._save(result.pipe)
        self._mark(stage, info)
        if result.finished and self.di.is_main:
            write_previews(self.out, stage, run_name, result.pipe, self.device, samples=kind.samples_preview)
        return result.finished

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
    with Trainer(config) as trainer:
        return trainer.run(stages, resume=resume, stop_after=stop_after, finetune=finetune)

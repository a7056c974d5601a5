"""The one optimisation loop shared by every stage.

AdamW, warm-up + cosine LR, autocast (bf16 on CPU, fp16 + GradScaler on CUDA), gradient clipping, EMA
(``torch.optim.swa_utils.AveragedModel``), tqdm with live loss, CSV log, and safetensors checkpoints with exact
resume. Data order and diffusion noise are derived from ``(seed, stage, step, rank)``, so a resumed run draws
exactly what the uninterrupted run would have drawn.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from ..distributed import current_context
from ..dtypes import autocast, resolve_dtype
from ..seeding import hash_seed
from .config import StageConfig

__all__ = ["StepContext", "LossFn", "run_stage", "lr_at"]


@dataclass
class StepContext:
    """What a loss function gets at each step.

    Attributes:
        step: 0-based optimiser step.
        indices: int64 ``(b,)`` training-sample indices of this rank's share of the batch.
        generator: CPU generator for this step's noise (seeded from seed, stage, step, rank).
        device: where the model lives.
    """

    step: int
    indices: torch.Tensor
    generator: torch.Generator
    device: torch.device


#: ``loss_fn(model, ctx) -> (loss, {name: float})``
LossFn = Callable[[nn.Module, StepContext], tuple[torch.Tensor, dict]]


def lr_at(step: int, cfg: StageConfig) -> float:
    """Linear warm-up then cosine decay from ``lr`` to ``lr * min_lr_ratio``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ------------------------------------------------------------------------------------------- checkpoints
def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def _ckpt_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(root: Path, step: int, model: nn.Module, opt: torch.optim.Optimizer,
                    ema: AveragedModel | None, scaler_state: dict | None, keep: int = 2) -> Path:
    """Write ``root/step-<step>/`` atomically (model, EMA and optimizer as safetensors + state.json)."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    if ema is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}, str(tmp / "ema.safetensors"))
    tensors, meta = _flatten_optimizer(opt)
    save_file(tensors or {"_empty": torch.zeros(1)}, str(tmp / "optimizer.safetensors"))
    state = {"step": step, "optimizer": meta, "scaler": scaler_state}
    (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in _ckpt_dirs(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, ema: AveragedModel | None) -> dict:
    """Restore a checkpoint written by :func:`save_checkpoint` (strict); returns its state.json."""
    state = json.loads((path / "state.json").read_text())
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    if ema is not None:
        ema.load_state_dict(load_file(str(path / "ema.safetensors")), strict=True)
    tensors = load_file(str(path / "optimizer.safetensors"))
    tensors.pop("_empty", None)
    opt.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
    return state


# ------------------------------------------------------------------------------------------- the loop
def run_stage(
    name: str,
    model: nn.Module,
    loss_fn: LossFn,
    cfg: StageConfig,
    *,
    num_samples: int,
    seed: int,
    device: torch.device,
    amp: str,
    ckpt_root: Path,
    log_file: Path,
    use_ema: bool,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
) -> tuple[nn.Module, bool]:
    """Optimise ``model`` (its parameters with ``requires_grad``) for ``cfg.steps`` steps.

    Args:
        name: stage name (seeds, logs).
        model: the module whose forward ``loss_fn`` calls; wrapped in DDP when distributed.
        loss_fn: computes the loss for a :class:`StepContext`.
        num_samples: size of the training set that ``indices`` refer to.
        stop_after: stop (without finishing) once this many total steps are done — for time-boxed runs and tests.

    Returns:
        the trained module (the EMA copy for diffusion stages) and whether all ``cfg.steps`` steps are done.
    """
    di = current_context()
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = None
    if use_ema and cfg.ema_decay > 0:
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    scaler = torch.amp.GradScaler(device.type) if (amp == "float16" and device.type == "cuda") else None
    start = 0
    if resume:
        ckpts = _ckpt_dirs(ckpt_root)
        if ckpts:
            state = load_checkpoint(ckpts[-1], model, opt, ema)
            start = int(state["step"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
    train_model: nn.Module = model
    if di.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    per_rank = max(1, cfg.batch_size // di.world_size)
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    writer = _CsvLog(log_file, keep_until=start) if di.is_main else None
    bar = tqdm(total=cfg.steps, initial=start, desc=name, disable=not (progress and di.is_main), leave=True)
    t0 = time.perf_counter()
    skipped = bad_steps = 0
    for step in range(start, end):
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        # 1. this step's batch: a fresh permutation derived from (seed, stage, step) — identical on every rank
        perm_gen = torch.Generator().manual_seed(hash_seed(seed, name, "data", step))
        if num_samples >= per_rank * di.world_size:
            perm = torch.randperm(num_samples, generator=perm_gen)[: per_rank * di.world_size]
        else:
            perm = torch.randint(0, num_samples, (per_rank * di.world_size,), generator=perm_gen)
        indices = perm[di.rank * per_rank : (di.rank + 1) * per_rank]
        noise_gen = torch.Generator().manual_seed(hash_seed(seed, name, "noise", step, di.rank))
        ctx = StepContext(step=step, indices=indices, generator=noise_gen, device=device)
        # 2. forward + backward
        with autocast(device.type, resolve_dtype(amp)):
            loss, logs = loss_fn(train_model, ctx)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{name}: loss became {loss.item()} at step {step}. Lower [stages.{name}].lr or use amp='float32'."
            )
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if scaler is not None:
            scaler.step(opt)  # GradScaler skips non-finite steps itself
            scaler.update()
        elif torch.isfinite(grad_norm):
            opt.step()
            bad_steps = 0
        else:
            # a non-finite gradient (seen with bf16 autocast on CPU): skip this update, never apply NaN weights
            skipped += 1
            bad_steps += 1
            if bad_steps >= 25:
                raise FloatingPointError(
                    f"{name}: 25 consecutive steps had non-finite gradients (step {step}). Use "
                    f"[stages.{name}].amp = 'float32' or a lower lr."
                )
        if ema is not None:
            ema.update_parameters(model)
        # 3. log, checkpoint
        done = step + 1
        if writer is not None and (done % cfg.log_every == 0 or done == end):
            writer.write({"step": done, "loss": float(loss.detach()), **logs, "lr": lr, "skipped_steps": skipped,
                          "seconds": round(time.perf_counter() - t0, 3)})
        bar.set_postfix(loss=f"{float(loss.detach()):.4f}", refresh=False)
        bar.update(1)
        if di.is_main and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
            save_checkpoint(ckpt_root, done, model, opt, ema, scaler.state_dict() if scaler else None)
    bar.close()
    finished = end >= cfg.steps
    if di.is_main and end > start:
        save_checkpoint(ckpt_root, end, model, opt, ema, scaler.state_dict() if scaler else None)
    if writer is not None:
        writer.close()
    di.barrier()
    model.eval()
    result = ema.module if ema is not None else model
    return result, finished


class _CsvLog:
    """Append-only CSV; on resume, rows after the checkpoint step are dropped first."""

    def __init__(self, path: Path, keep_until: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.fields: list[str] | None = None
        rows = []
        if path.is_file() and keep_until > 0:
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                self.fields = reader.fieldnames
                rows = [r for r in reader if int(r["step"]) <= keep_until]
        self.f = open(path, "w", newline="")
        self.writer = None
        if self.fields:
            self.writer = csv.DictWriter(self.f, fieldnames=self.fields, extrasaction="ignore")
            self.writer.writeheader()
            self.writer.writerows(rows)

    def write(self, row: dict) -> None:
        if self.writer is None:
            self.fields = list(row)
            self.writer = csv.DictWriter(self.f, fieldnames=self.fields, extrasaction="ignore")
            self.writer.writeheader()
        self.writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        self.f.flush()

    def close(self) -> None:
        self.f.close()

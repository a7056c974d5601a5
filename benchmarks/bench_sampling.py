"""Sampling speed and memory of duodiff, stage by stage, against MONAI's inferers in the same run.

Stages timed separately: label denoising, label decode, image denoising (UNet + ControlNet), image
decode. Rows cover dtype x sampler/steps x batch size x volume preset; each reports latency per
batch, pairs/s and peak memory (CUDA: ``max_memory_allocated``; CPU: peak RSS of the process,
reset per stage through ``/proc/self/clear_refs``).

Baseline (same weights, same run): MONAI's ``LatentDiffusionInferer.sample`` (label stage) and the
ControlNet inferer loop (image stage) with 1000 DDPM steps in fp32, batch 1. MONAI's
``ControlNetLatentDiffusionInferer.sample`` resizes the ControlNet condition to the *latent* size
before calling its parent loop, which fails for a ControlNet that takes the label map at image
resolution (duodiff's design, and MONAI's own ``conditioning_embedding_num_channels`` default); so
the image-stage baseline calls that parent loop (``ControlNetDiffusionInferer.sample``, what
``ControlNetLatentDiffusionInferer.sample`` runs after its resize) and then
``autoencoder.decode_stage_2_outputs`` exactly as the latent inferer does.

Long loops can be timed on their first ``--max-steps`` steps and extrapolated linearly (each step
costs the same); such rows are marked ``extrapolated``. Decode time does not depend on the sampler
and is measured once per (preset, dtype, batch).

Quality parity (needs a trained model: ``--model`` or the bundled one): label-volume statistics
of N label maps from duodiff DDIM-50 (low precision) against N from the MONAI DDPM-1000 fp32
baseline; each foreground class's mean volume must agree within 10 %.

Issue 16 parts (``--parts``): ``sweep`` samples the same seeds with DDIM, DPM-Solver++ and UniPC at 5-50 steps
and compares each set with DDIM-50 (per-class median label volume, pair consistency with the segmenter of
``docs/results/evaluate``, FID-2.5D on that segmenter's encoder) and prints the fastest row at equal quality
(``EQUAL_QUALITY``), with a plot of seconds per pair against each measure (``*_sweep.png``); ``dtypes`` times each
stage in float32, the low-precision dtype and ``dtype="auto"``'s choice (and auto's first-use cost); ``load`` times
``duodiff sample -n 4`` with default settings beside 0 and 1 busy loops (wants an otherwise idle machine).

Examples::

    python benchmarks/bench_sampling.py --parts timing sweep dtypes load   # the full CPU run (~40 min, idle machine)
    python benchmarks/bench_sampling.py --parts sweep                      # only the quality-vs-steps sweep
    python benchmarks/bench_sampling.py --device cuda --preset paper --batch-sizes 1 4 8 --dtypes float16
    duodiff bench -- --quick                                  # the same script through the CLI
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]


def shown(path: str | Path) -> str:
    """A path as the reports record it: relative to the repository when inside it (no machine paths in results)."""
    p = Path(path).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(path)
SAMPLERS = {"ddpm-1000": ("ddpm", 1000), "ddim-50": ("ddim", 50), "ddim-20": ("ddim", 20)}
LOW_PRECISION = {"cpu": "bfloat16", "cuda": "float16"}
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


# ------------------------------------------------------------------------------------------- measuring
class Memory:
    """Peak memory of a block: CUDA max allocated, or CPU peak RSS (VmHWM reset before the block)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.can_reset_rss = Path("/proc/self/clear_refs").exists()

    @staticmethod
    def _status(field: str) -> int:
        m = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
        return int(m.group(1)) * 1024 if m else 0

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.can_reset_rss:
            with contextlib.suppress(OSError):
                Path("/proc/self/clear_refs").write_text("5")

    def peak(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if Path("/proc/self/status").exists():
            return self._status("VmHWM")
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def timed(device: torch.device, memory: Memory, fn: Callable[[], Any]) -> tuple[Any, float, int]:
    """Run ``fn`` once: (result, seconds, peak bytes)."""
    memory.reset()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0, memory.peak()


def autocast(device: torch.device, dtype: str):
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


# ------------------------------------------------------------------------------------------- models
def load_trained(path: str, device: str):
    """A saved model; the bundled one (and any folder holding only fp16 weights) loads its fp16 variant."""
    from duodiff import DuoDiffusion

    try:
        return DuoDiffusion.from_pretrained(path, device=device)
    except FileNotFoundError:
        return DuoDiffusion.from_pretrained(path, device=device, variant="fp16")


def load_pipelines(args, device: torch.device) -> dict[str, tuple[Any, str]]:
    """preset -> (pipeline, description of the weights)."""
    from duodiff import DuoDiffusion
    from duodiff.testing import randomize_weights

    out = {}
    for preset in args.preset:
        if preset == "hippocampus" and args.trained is not None:
            pipe = load_trained(args.trained, str(device))
            out[preset] = (pipe, f"trained ({shown(args.trained)})")
            continue
        pipe = DuoDiffusion.from_preset(preset, num_classes=3)
        randomize_weights(pipe, seed=0, std=0.02)
        out[preset] = (pipe.to(device), "random")
    return out


def find_trained_model(explicit: str | None) -> str | None:
    if explicit:
        if explicit.lower() == "none":
            return None
        return explicit
    try:
        from duodiff.bundled import bundled_model_path

        return str(bundled_model_path())
    except (FileNotFoundError, ImportError):
        return None


def attribute_context(pipe, n: int):
    """(context, null_context) for unconditional sampling of an attribute-conditioned label model."""
    from duodiff.attributes import attribute_context as contexts

    _, _, context, null_context = contexts(pipe.config, None, n)
    if context is None:
        return None, None
    return context.to(pipe.device), null_context.to(pipe.device)


# ------------------------------------------------------------------------------------------- duodiff stages
def scheduler_for(pipe, name: str, steps: int, measured: int, kind: str):
    from duodiff.schedulers import make_scheduler

    sched = make_scheduler(name, pipe.config.schedule_of(kind))
    sched.set_timesteps(steps, device=pipe.device)
    if measured < steps:
        sched.timesteps = sched.timesteps[:measured]  # the first `measured` steps of the real schedule
    return sched


def duodiff_denoise(pipe, device, memory, dtype, sampler, steps, batch, max_steps, seed=0):
    """Time label and image denoising for one config. Returns (stage dict, latents for decoding)."""
    from duodiff.sampling import denoise, initial_noise, is_stochastic, stage_generators

    name, measured = sampler, min(steps, max_steps)
    seeds = list(range(seed, seed + batch))
    context, null_context = attribute_context(pipe, batch)
    stochastic = is_stochastic(name)
    res: dict[str, Any] = {"measured_steps": measured}
    with torch.inference_mode(), autocast(device, dtype):
        gens = stage_generators(seeds, "label")
        noise = initial_noise(gens, pipe.config.label_latent_shape, pipe.device)
        sched = scheduler_for(pipe, name, steps, measured, "label")
        zl, t, m = timed(device, memory, lambda: denoise(
            pipe.label_unet, sched, noise, generators=gens, stochastic=stochastic, progress=False,
            context=context, null_context=null_context))
        res["label_denoise_s"], res["label_denoise_peak"] = t * steps / measured, m
        labels = torch.zeros((batch, 1, *pipe.config.volume_shape), dtype=torch.long, device=pipe.device)
        cond = pipe.one_hot(labels)
        gens = stage_generators(seeds, "image")
        noise = initial_noise(gens, pipe.config.image_latent_shape, pipe.device)
        sched = scheduler_for(pipe, name, steps, measured, "image")
        zi, t, m = timed(device, memory, lambda: denoise(
            pipe.image_unet, sched, noise, generators=gens, stochastic=stochastic, controlnet=pipe.image_controlnet,
            condition=cond, progress=False))
        res["image_denoise_s"], res["image_denoise_peak"] = t * steps / measured, m
    return res, zl, zi


def duodiff_decode(pipe, device, memory, dtype, zl, zi):
    res = {}
    with torch.inference_mode(), autocast(device, dtype):
        _, t, m = timed(device, memory, lambda: pipe.decode_labels(zl, decode_tile_size=None))
        res["label_decode_s"], res["label_decode_peak"] = t, m
        _, t, m = timed(device, memory, lambda: pipe.decode_images(zi, decode_tile_size=None))
        res["image_decode_s"], res["image_decode_peak"] = t, m
    return (res,)


def warm_up(pipe, device, dtype, batch):
    """One short pass so oneDNN/cuDNN kernel selection and autocast caches are not timed."""
    mem = Memory(device)
    _, zl, zi = duodiff_denoise(pipe, device, mem, dtype, "ddim", 50, batch, 2)
    duodiff_decode(pipe, device, mem, dtype, zl, zi)


def best_of(repeats: int, fn: Callable[[], tuple]) -> tuple:
    """Run ``fn`` (returning ``(stage dict, ...)``) ``repeats`` times; keep each stage's fastest time.

    The minimum is the usual estimator on a shared machine: interference only ever adds time.
    """
    runs = [fn() for _ in range(max(1, repeats))]
    best = dict(runs[0][0])
    for r in runs[1:]:
        for k, v in r[0].items():
            if k.endswith("_s"):
                best[k] = min(best[k], v)
            elif k.endswith("_peak"):
                best[k] = max(best[k], v)
    best["repeats"] = len(runs)
    return (best, *runs[-1][1:])


# ------------------------------------------------------------------------------------------- MONAI baseline
def monai_baseline(pipe, device, memory, steps: int, batch: int, seed: int = 0) -> dict[str, Any]:
    """MONAI inferers, DDPM-``steps`` in fp32; timed on ``steps`` steps (scaled to 1000 if fewer)."""
    from monai.inferers import ControlNetDiffusionInferer, ControlNetLatentDiffusionInferer, LatentDiffusionInferer
    from monai.networks.schedulers import DDPMScheduler

    c = pipe.config.scheduler
    total = 1000

    def ddpm():
        s = DDPMScheduler(num_train_timesteps=c.num_train_timesteps, schedule=c.schedule, beta_start=c.beta_start,
                          beta_end=c.beta_end, prediction_type=c.prediction_type, clip_sample=False)
        s.set_timesteps(total, device=pipe.device)
        if steps < total:
            s.timesteps = s.timesteps[:steps]
        return s

    context, _ = attribute_context(pipe, batch)
    g = torch.Generator().manual_seed(seed)
    res: dict[str, Any] = {"measured_steps": steps}
    with torch.inference_mode(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # MONAI's DDPM step draws its noise from the global RNG
        noise = torch.randn((batch, *pipe.config.label_latent_shape), generator=g).to(pipe.device)
        sched = ddpm()
        inferer = LatentDiffusionInferer(sched, scale_factor=pipe.config.label_scale_factor)
        logits, t, m = timed(device, memory, lambda: inferer.sample(
            input_noise=noise, autoencoder_model=pipe.label_autoencoder, diffusion_model=pipe.label_unet,
            scheduler=sched, conditioning=context, mode="crossattn", verbose=False))
        labels = logits.argmax(1, keepdim=True)
        zl = torch.randn((batch, *pipe.config.label_latent_shape), generator=g).to(pipe.device)
        _, t_dec, _ = timed(device, memory, lambda: pipe.label_autoencoder.decode_stage_2_outputs(
            zl / pipe.config.label_scale_factor))
        res["label_total_s"] = (t - t_dec) * total / steps + t_dec
        res["label_decode_s"], res["label_peak"] = t_dec, m

        noise = torch.randn((batch, *pipe.config.image_latent_shape), generator=g).to(pipe.device)
        sched = ddpm()
        inferer = ControlNetLatentDiffusionInferer(sched, scale_factor=pipe.config.image_scale_factor)
        cond = pipe.one_hot(labels)

        def image_stage():
            # ControlNetLatentDiffusionInferer.sample minus its resize of the condition to latent size
            latent = ControlNetDiffusionInferer.sample(
                inferer, input_noise=noise, diffusion_model=pipe.image_unet, controlnet=pipe.image_controlnet,
                cn_cond=cond, scheduler=sched, verbose=False)
            return pipe.image_autoencoder.decode_stage_2_outputs(latent / inferer.scale_factor)

        _, t, m = timed(device, memory, image_stage)
        _, t_dec, _ = timed(device, memory, lambda: pipe.image_autoencoder.decode_stage_2_outputs(
            noise / pipe.config.image_scale_factor))
        res["image_total_s"] = (t - t_dec) * total / steps + t_dec
        res["image_decode_s"], res["image_peak"] = t_dec, m
    res["latency_s"] = res["label_total_s"] + res["image_total_s"]
    res["pairs_per_s"] = batch / res["latency_s"]
    res["extrapolated"] = steps < total
    return res


# ------------------------------------------------------------------------------------------- parity
def label_volume_stats(labels: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """Per-class voxel counts of int labels (N, 1, H, W, D): mean, std and the share of empty maps."""
    counts = torch.stack([(labels == k).flatten(1).sum(1).float() for k in range(num_classes)], 1)  # (N, K)
    return {
        "mean_voxels": counts.mean(0).tolist(),
        "std_voxels": counts.std(0).tolist() if counts.shape[0] > 1 else [0.0] * num_classes,
        "empty_fraction": (counts[:, 1:] == 0).float().mean(0).tolist(),
    }


def parity(pipe, device, dtype: str, n: int, seed: int = 1000) -> dict[str, Any]:
    """Label-volume statistics: duodiff DDIM-50 (``dtype``) vs MONAI DDPM-1000 fp32, N maps each."""
    from monai.inferers import LatentDiffusionInferer
    from monai.networks.schedulers import DDPMScheduler

    k = pipe.config.num_classes
    t0 = time.perf_counter()
    fast = pipe.sample_labels(n, seed=seed, num_inference_steps=50, scheduler="ddim", dtype=dtype, progress=False)
    t_fast = time.perf_counter() - t0
    c = pipe.config.scheduler
    sched = DDPMScheduler(num_train_timesteps=c.num_train_timesteps, schedule=c.schedule, beta_start=c.beta_start,
                          beta_end=c.beta_end, prediction_type=c.prediction_type, clip_sample=False)
    sched.set_timesteps(1000, device=pipe.device)
    context, _ = attribute_context(pipe, n)
    t0 = time.perf_counter()
    with torch.inference_mode(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        noise = torch.randn((n, *pipe.config.label_latent_shape)).to(pipe.device)
        logits = LatentDiffusionInferer(sched, scale_factor=pipe.config.label_scale_factor).sample(
            input_noise=noise, autoencoder_model=pipe.label_autoencoder, diffusion_model=pipe.label_unet,
            scheduler=sched, conditioning=context, mode="crossattn", verbose=False)
    base = logits.argmax(1, keepdim=True).cpu()
    t_base = time.perf_counter() - t0
    sf, sb = label_volume_stats(fast.cpu(), k), label_volume_stats(base, k)
    rel = [abs(a - b) / max(b, 1e-9) for a, b in zip(sf["mean_voxels"][1:], sb["mean_voxels"][1:])]
    return {
        "num_samples": n, "fast": f"duodiff DDIM-50 {SHORT[dtype]}", "baseline": "MONAI LatentDiffusionInferer "
        "DDPM-1000 fp32", "fast_stats": sf, "baseline_stats": sb, "relative_difference": rel,
        "max_relative_difference": max(rel), "passes_10_percent": max(rel) <= 0.10,
        "label_names": list(pipe.config.label_names), "fast_seconds": t_fast, "baseline_seconds": t_base,
    }


# ------------------------------------------------------------------------------------------- quality vs steps
#: Samplers and step counts of the sweep (each stage runs ``steps`` steps).
SWEEP_SAMPLERS = ("ddim", "dpmsolver++", "unipc")
SWEEP_STEPS = (5, 10, 15, 20, 30, 50)
#: Equal quality to the DDIM-50 reference: per-class median label volume within 5 %, mean pair-consistency Dice
#: within 0.02, FID-2.5D within 10 % of the reference's FID (issue 16).
EQUAL_QUALITY = {"label_median": 0.05, "consistency": 0.02, "fid": 0.10}
DEFAULT_SEGMENTER = Path(__file__).resolve().parents[1] / "docs" / "results" / "evaluate"


def load_segmenter(path: str | None, num_classes: int):
    """The pair-consistency segmenter (its encoder is the FID feature network), or ``(None, why)``."""
    from duodiff.segmenter import SliceSegmenter

    folder = Path(path) if path else DEFAULT_SEGMENTER
    if not (folder / "segmenter.json").is_file():
        return None, f"no segmenter in {folder} (pass --segmenter DIR written by `duodiff evaluate`)"
    seg = SliceSegmenter.load(folder)
    if seg.num_classes != num_classes:
        return None, f"the segmenter in {folder} predicts {seg.num_classes} classes, the model {num_classes}"
    return seg, shown(folder)


def sample_timed(pipe, sampler: str, steps: int, seeds: list[int], dtype: str, batch: int):
    """``(DuoSample, seconds per pair)`` of ``pipe.sample`` over ``seeds`` in batches of ``batch``."""
    t0 = time.perf_counter()
    out = pipe.sample(len(seeds), seed=seeds, num_inference_steps=steps, scheduler=sampler, dtype=dtype,
                      batch_size=batch, progress=False)
    if pipe.device.type == "cuda":
        torch.cuda.synchronize(pipe.device)
    return out, (time.perf_counter() - t0) / len(seeds)


def quality(out, ref, segmenter, fid_images: torch.Tensor | None, num_classes: int) -> dict[str, Any]:
    """Quality of one sample set against the reference set ``ref`` (same seeds): label-volume medians, pair
    consistency (mean foreground Dice of ``segmenter(image)`` vs label) and FID-2.5D against ``fid_images``."""
    from duodiff.metrics import class_volumes, pair_consistency
    from duodiff.metrics.features import slice_features
    from duodiff.metrics.fid import frechet_distance
    from duodiff.segmenter import PLANES

    med = torch.as_tensor(class_volumes(out.labels, num_classes)).median(0).values
    ref_med = torch.as_tensor(class_volumes(ref.labels, num_classes)).median(0).values
    res: dict[str, Any] = {
        "label_median_voxels": med.tolist(),
        "label_median_rel_diff": [float(abs(a - b) / max(float(b), 1.0)) for a, b in zip(med, ref_med)],
        "label_agreement": float((out.labels == ref.labels).float().mean()),
    }
    res["label_median_max_rel_diff"] = max(res["label_median_rel_diff"])
    if segmenter is not None:
        with torch.inference_mode():
            res["consistency"] = pair_consistency(out.images, out.labels, segmenter, num_classes=num_classes)[
                "mean_dice"]
            if fid_images is not None:
                per_plane = [frechet_distance(slice_features(fid_images, segmenter.encoder, p),
                                              slice_features(out.images, segmenter.encoder, p)) for p in PLANES]
                res["fid"] = sum(per_plane) / len(per_plane)
    return res


def equal_quality(row: dict[str, Any], reference: dict[str, Any]) -> bool | None:
    """Whether ``row`` meets :data:`EQUAL_QUALITY` against the reference row (None: nothing to compare)."""
    checks = [row["label_median_max_rel_diff"] <= EQUAL_QUALITY["label_median"]]
    if "consistency" in row and "consistency" in reference:
        checks.append(row["consistency"] >= reference["consistency"] - EQUAL_QUALITY["consistency"])
    if "fid" in row and "fid" in reference:
        checks.append(row["fid"] <= reference["fid"] * (1 + EQUAL_QUALITY["fid"]))
    return all(checks)


def quality_sweep(pipe, args, device: torch.device, auto_dtype: str | None = None) -> dict[str, Any]:
    """Seconds per pair and quality of each sampler at each step count, against a DDIM reference.

    ``--sweep-dtype auto`` uses ``auto_dtype`` (the dtype table's fresh measurement) when given, else measures
    afresh (never a choice cached by an earlier run on another load).
    """
    import tempfile

    from duodiff.precision import CACHE_FILE, choose_dtype, is_auto
    from duodiff.schedulers import DIFFUSERS_SAMPLERS

    k = pipe.config.num_classes
    dtype = args.sweep_dtype
    if is_auto(dtype) and auto_dtype:
        dtype = auto_dtype
    elif is_auto(dtype):
        with tempfile.TemporaryDirectory() as tmp:
            dtype = str(choose_dtype(pipe, args.sweep_reference_steps, cache_path=Path(tmp) / CACHE_FILE))
        dtype = dtype.removeprefix("torch.")
    segmenter, seg_note = load_segmenter(args.segmenter, k)
    if segmenter is not None:
        segmenter = segmenter.to(device)
    seeds = list(range(args.sweep_seed, args.sweep_seed + args.sweep_samples))
    batch = min(args.sweep_batch, len(seeds))
    samplers = []
    for s in args.sweep_samplers:
        if s in DIFFUSERS_SAMPLERS:
            try:
                import diffusers  # noqa: F401
            except ImportError:
                print(f"sweep: skipping {s}: diffusers is not installed (pip install -e '.[samplers]')", flush=True)
                continue
        samplers.append(s)
    sweep: dict[str, Any] = {"dtype": dtype, "num_samples": len(seeds), "batch": batch, "segmenter": seg_note,
                             "reference_sampler": f"ddim-{args.sweep_reference_steps}", "equal_quality": EQUAL_QUALITY,
                             "rows": []}
    print(f"sweep: reference DDIM-{args.sweep_reference_steps}, {len(seeds)} pairs, {dtype}, batch {batch} ...",
          flush=True)
    pipe.sample(1, seed=0, num_inference_steps=2, dtype=dtype, progress=False)  # warm-up
    ref, ref_s = sample_timed(pipe, "ddim", args.sweep_reference_steps, seeds, dtype, batch)
    fid_images, fid_note = None, None
    if segmenter is not None:
        if args.real:
            from duodiff.metrics import load_pairs

            real = load_pairs(args.real, volume_shape=pipe.config.volume_shape,
                              intensity_percentiles=getattr(pipe.config, "intensity_percentiles", None),
                              max_cases=args.sweep_samples * 4)
            fid_images, fid_note = real.images, f"{len(real)} real pairs from {args.real}"
        else:  # an independent reference set: FID measures distance to the reference distribution
            other = [s + 100_000 for s in seeds]
            fid_images = sample_timed(pipe, "ddim", args.sweep_reference_steps, other, dtype, batch)[0].images
            fid_note = (f"{len(other)} DDIM-{args.sweep_reference_steps} pairs with other seeds (no --real); the "
                        "reference's own FID is the noise floor of this sample size")
    sweep["fid_reference"] = fid_note
    reference = {"sampler": "ddim", "steps": args.sweep_reference_steps, "seconds_per_pair": ref_s,
                 **quality(ref, ref, segmenter, fid_images, k)}
    sweep["reference"] = reference
    print(f"sweep: reference {ref_s:.2f} s/pair, consistency {reference.get('consistency')}, "
          f"FID {reference.get('fid')}", flush=True)
    for sampler in samplers:
        for steps in args.sweep_steps:
            out, s_per_pair = sample_timed(pipe, sampler, steps, seeds, dtype, batch)
            row = {"sampler": sampler, "steps": steps, "seconds_per_pair": s_per_pair,
                   **quality(out, ref, segmenter, fid_images, k)}
            row["equal_quality"] = equal_quality(row, reference)
            sweep["rows"].append(row)
            print(f"sweep: {sampler:11s} {steps:3d} steps: {s_per_pair:6.2f} s/pair, label medians "
                  f"{row['label_median_max_rel_diff']:.1%} off, consistency {row.get('consistency', float('nan')):.3f},"
                  f" FID {row.get('fid', float('nan')):.3f} -> equal quality: {row['equal_quality']}", flush=True)
    passing = [r for r in sweep["rows"] if r["equal_quality"]]
    best = min(passing, key=lambda r: r["seconds_per_pair"]) if passing else None
    sweep["fastest_equal_quality"] = None if best is None else {
        "sampler": best["sampler"], "steps": best["steps"], "seconds_per_pair": best["seconds_per_pair"],
        "speedup_vs_reference": ref_s / best["seconds_per_pair"]}
    sweep["default_rule"] = default_rule(sweep, core=[s for s in samplers if s not in DIFFUSERS_SAMPLERS])
    return sweep


DEFAULT_RULE = ("the default is a sampler of the core install (no optional extra) at twice the smallest step count "
                "from which it meets equal quality at every swept step count (a 2x margin for models harder than "
                "the one swept); among core samplers, the one with the fewest such steps")


def default_rule(sweep: dict[str, Any], core: Sequence[str]) -> dict[str, Any] | None:
    """The default (sampler, steps) by :data:`DEFAULT_RULE` from the sweep's rows, or None.

    ``stable_from`` is the smallest swept step count from which every larger swept count meets equal quality;
    the default is ``2 * stable_from`` steps (issue 16: "pick the default sampler and step count from it").
    """
    best = None
    for sampler in core:
        rows = sorted((r for r in sweep["rows"] if r["sampler"] == sampler), key=lambda r: r["steps"])
        stable = None
        for r in reversed(rows):
            if not r["equal_quality"]:
                break
            stable = r
        if stable is None:
            continue
        steps = 2 * stable["steps"]
        timed = next((r for r in rows if r["steps"] == steps), None)
        cand = {"sampler": sampler, "steps": steps, "stable_from": stable["steps"],
                "seconds_per_pair": None if timed is None else timed["seconds_per_pair"]}
        if best is None or steps < best["steps"]:
            best = cand
    if best is not None:
        best["rule"] = DEFAULT_RULE
    return best


def markdown_sweep(sweep: dict[str, Any], label_names: Sequence[str]) -> list[str]:
    ref = sweep["reference"]
    eq = sweep["equal_quality"]
    lines = ["", f"## Quality vs steps ({sweep['num_samples']} pairs per row, {sweep['dtype']}, "
             f"batch {sweep['batch']})", "",
             f"Reference: {sweep['reference_sampler']} on the same seeds ({ref['seconds_per_pair']:.2f} s/pair). "
             f"Equal quality: every class's median label volume within {eq['label_median']:.0%} of the reference, "
             f"pair consistency (mean foreground Dice of the segmenter, {sweep['segmenter']}) at most "
             f"{eq['consistency']} below it, FID-2.5D at most {eq['fid']:.0%} above it (FID against "
             f"{sweep['fid_reference']}).", "",
             "| sampler | steps | s / pair | label median diff (" + ", ".join(label_names[1:]) + ") | "
             "label voxels = reference | consistency | FID-2.5D | equal quality |",
             "|---|---:|---:|---|---:|---:|---:|---|"]

    def fmt(r):
        diffs = ", ".join(f"{d:.1%}" for d in r["label_median_rel_diff"])
        cons = f"{r['consistency']:.3f}" if "consistency" in r else "-"
        fid = f"{r['fid']:.3f}" if "fid" in r else "-"
        return f"{r['seconds_per_pair']:.2f} | {diffs} | {r['label_agreement']:.3f} | {cons} | {fid}"

    lines.append(f"| ddim (reference) | {ref['steps']} | {fmt(ref)} | - |")
    for r in sweep["rows"]:
        lines.append(f"| {r['sampler']} | {r['steps']} | {fmt(r)} | {'yes' if r['equal_quality'] else 'no'} |")
    best = sweep["fastest_equal_quality"]
    lines.append("")
    lines.append("Fastest at equal quality: " + ("none of the rows" if best is None else
                 f"**{best['sampler']}-{best['steps']}**, {best['seconds_per_pair']:.2f} s/pair, "
                 f"{best['speedup_vs_reference']:.1f}x the reference") + ".")
    rule = sweep.get("default_rule")
    if rule is not None:
        timed = "" if rule["seconds_per_pair"] is None else f", {rule['seconds_per_pair']:.2f} s/pair"
        lines += ["", f"Default by the rule ({rule['rule']}): **{rule['sampler']}-{rule['steps']}** (equal quality "
                  f"from {rule['stable_from']} steps on{timed})."]
    return lines


def plot_sweep(sweep: dict[str, Any], path: Path, title: str) -> None:
    """Seconds per pair (x, log) against each quality measure (one panel each), a line per sampler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = sweep["reference"]
    panels = [("label_median_max_rel_diff", "largest class median-volume difference vs reference")]
    panels += [(k, n) for k, n in (("consistency", "pair consistency (mean Dice)"), ("fid", "FID-2.5D"))
               if k in ref]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, (key, name) in zip(axes[0], panels):
        for sampler in dict.fromkeys(r["sampler"] for r in sweep["rows"]):
            rows = [r for r in sweep["rows"] if r["sampler"] == sampler]
            ax.plot([r["seconds_per_pair"] for r in rows], [r[key] for r in rows], "o-", label=sampler)
            for r in rows:
                ax.annotate(str(r["steps"]), (r["seconds_per_pair"], r[key]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.plot([ref["seconds_per_pair"]], [ref[key]], "k*", ms=10, label=sweep["reference_sampler"])
        ax.set_xscale("log")
        ax.set_xlabel("seconds per pair (log)")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep_ratios(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Seconds per pair of the sweep's fastest equal-quality row and of the rule's default vs the MONAI baseline."""
    sweep = result["sweep"]
    base = next((b for b in result["baselines"] if b["preset"] == sweep["preset"]), None)
    ratios = []
    picks = [("fastest sweep row at equal quality", sweep.get("fastest_equal_quality")),
             ("default by the rule", sweep.get("default_rule"))]
    for what, pick in picks:
        if pick and pick.get("seconds_per_pair") and base:
            ratios.append({
                "name": f"{sweep['preset']}: {what} ({pick['sampler']}-{pick['steps']}, {sweep['dtype']}, batch "
                        f"{sweep['batch']}) vs MONAI DDPM-1000 fp32 (batch 1), seconds per pair",
                "value": base["latency_s"] / pick["seconds_per_pair"], "target": 100,
                "baseline_extrapolated": base["extrapolated"]})
    return ratios


# ------------------------------------------------------------------------------------------- dtype table
def dtype_table(pipe, device: torch.device, dtypes: Sequence[str], steps: int, repeats: int) -> dict[str, Any]:
    """Seconds per stage of DDIM-``steps``, batch 1, in each fixed dtype and in ``dtype="auto"``'s choice.

    ``auto``'s first use on a model (timing the candidates, :mod:`duodiff.precision`) is measured separately with
    an empty cache; its rows then time the chosen dtype like the others. Repeats are interleaved across dtypes
    and each stage keeps its fastest run.
    """
    import tempfile

    from duodiff import precision

    with tempfile.TemporaryDirectory() as tmp:
        os.environ.pop(precision.AUTO_DTYPE_ENV, None)
        t0 = time.perf_counter()
        chosen = precision.choose_dtype(pipe, steps, cache_path=Path(tmp) / precision.CACHE_FILE)
        first_use_s = time.perf_counter() - t0
        key = precision.cache_key(pipe)
        trials = json.loads((Path(tmp) / precision.CACHE_FILE).read_text())["entries"][key]["trials"] \
            if (Path(tmp) / precision.CACHE_FILE).is_file() else None
    auto = str(chosen).removeprefix("torch.")
    names = [*dict.fromkeys(dtypes), "auto"]
    mem = Memory(device)
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for name in names:
        warm_up(pipe, device, auto if name == "auto" else name, 1)
    for _ in range(max(1, repeats)):
        for name in names:
            dt = auto if name == "auto" else name
            den, zl, zi = duodiff_denoise(pipe, device, mem, dt, "ddim", steps, 1, steps)
            (dec,) = duodiff_decode(pipe, device, mem, dt, zl, zi)
            runs[name].append({**den, **dec})
    rows = []
    stages = ("label_denoise_s", "label_decode_s", "image_denoise_s", "image_decode_s")
    for name in names:
        row = {"dtype": name, "resolved": auto if name == "auto" else name,
               **{s: min(r[s] for r in runs[name]) for s in stages}}
        row["latency_s"] = sum(row[s] for s in stages)
        rows.append(row)
    fixed = [r for r in rows if r["dtype"] != "auto"]
    best = min(fixed, key=lambda r: r["latency_s"])
    auto_row = rows[-1]
    return {"steps": steps, "repeats": repeats, "auto_dtype": auto, "auto_first_use_s": first_use_s,
            "auto_trials": trials, "rows": rows, "best_fixed": best["dtype"],
            "auto_vs_best_fixed": auto_row["latency_s"] / best["latency_s"]}


def markdown_dtype_table(t: dict[str, Any]) -> list[str]:
    lines = ["", f"## dtype per stage (DDIM-{t['steps']}, batch 1, fastest of {t['repeats']} interleaved runs)", "",
             f"`dtype=\"auto\"` chose **{t['auto_dtype']}** (first use on this model: {t['auto_first_use_s']:.1f} s "
             f"of timing, then cached); auto / best fixed dtype ({t['best_fixed']}) = "
             f"**{t['auto_vs_best_fixed']:.2f}x** (target <= 1.05).", "",
             "| dtype | label denoise s | label decode s | image denoise s | image decode s | total s |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in t["rows"]:
        name = f"auto ({r['resolved']})" if r["dtype"] == "auto" else r["dtype"]
        lines.append(f"| {name} | {r['label_denoise_s']:.3f} | {r['label_decode_s']:.3f} | "
                     f"{r['image_denoise_s']:.3f} | {r['image_decode_s']:.3f} | {r['latency_s']:.3f} |")
    return lines


# ------------------------------------------------------------------------------------------- busy machine
def load_check(model: str | None, steps: int | None, num_samples: int,
               competitors: Sequence[int]) -> list[dict[str, Any]]:
    """Wall seconds of ``duodiff sample -n N`` with default settings while 0, 1, ... busy loops run.

    The command runs as a new process without ``OMP_NUM_THREADS`` (so duodiff picks its thread count by load);
    each busy loop is a ``python -c 'while True: pass'`` started before and killed after the command.
    """
    import shutil
    import subprocess
    import tempfile

    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    cmd = [sys.executable, "-m", "duodiff.cli.main", "sample", "-n", str(num_samples)]
    cmd += [] if steps is None else ["--steps", str(steps)]
    if model:
        cmd += ["--model", model]
    rows = []
    for k in competitors:
        out = tempfile.mkdtemp(prefix="duodiff-load-check-")
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(k)]
        try:
            t0 = time.perf_counter()
            proc = subprocess.run([*cmd, "--out", out], env=env, capture_output=True, text=True, timeout=3600)
            wall = time.perf_counter() - t0
        finally:
            for p in busy:  # only the processes started here
                p.kill()
                p.wait()
            shutil.rmtree(out, ignore_errors=True)
        if proc.returncode != 0:
            raise RuntimeError(f"duodiff sample failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
        note = next((line for line in proc.stderr.splitlines() if line.startswith("generating")), "")
        note = note.replace(out, "OUT")
        rows.append({"competitors": k, "wall_s": wall, "announce": note})
        how = "" if steps is None else f" --steps {steps}"
        print(f"load check: {k} competing busy loop(s): duodiff sample -n {num_samples}{how}: {wall:.1f} s"
              f"  [{note}]", flush=True)
    return rows


# ------------------------------------------------------------------------------------------- cores
def cores_check(pipe, steps: int, dtype: str, batches: Sequence[int], repeats: int) -> dict[str, Any]:
    """Pairs per second of DDIM-``steps`` at each batch size on 1 thread and on all of torch's threads.

    The issue-16 check "use the cores": batch B on all threads against batch 1 on one thread. Each configuration
    samples ``max(batches)`` pairs (seeds 0..B-1) ``repeats`` times, runs interleaved, and keeps its fastest run.
    """
    full = torch.get_num_threads()
    threads = sorted({1, full})
    n = max(batches)
    seeds = list(range(n))
    pipe.sample(1, seed=0, num_inference_steps=2, dtype=dtype, progress=False)  # warm-up
    best: dict[tuple[int, int], float] = {}
    try:
        for _ in range(max(1, repeats)):
            for t in threads:
                torch.set_num_threads(t)
                for b in batches:
                    _, s = sample_timed(pipe, "ddim", steps, seeds, dtype, b)
                    best[(t, b)] = min(best.get((t, b), float("inf")), s)
                    print(f"cores: {t} thread(s), batch {b}: {1 / s:.3f} pairs/s", flush=True)
    finally:
        torch.set_num_threads(full)
    rows = [{"threads": t, "batch": b, "seconds_per_pair": s, "pairs_per_s": 1 / s} for (t, b), s in best.items()]
    base = best[(1, 1)]
    top = min(((t, b) for t, b in best if t == full), key=lambda k: best[k])
    return {"steps": steps, "dtype": dtype, "pairs": n, "repeats": repeats, "rows": rows,
            "best_all_threads": {"threads": top[0], "batch": top[1]},
            "speedup_vs_1_thread_batch_1": base / best[top], "target": 1.6}


def markdown_cores(c: dict[str, Any]) -> list[str]:
    lines = ["", f"## Use the cores: DDIM-{c['steps']} {c['dtype']}, {c['pairs']} pairs per run, fastest of "
             f"{c['repeats']}", "", "| threads | batch | s per pair | pairs/s |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['threads']} | {r['batch']} | {r['seconds_per_pair']:.3f} | {r['pairs_per_s']:.3f} |"
              for r in c["rows"]]
    top = c["best_all_threads"]
    ok = "met" if c["speedup_vs_1_thread_batch_1"] >= c["target"] else "NOT met"
    lines.append(f"\nBatch {top['batch']} on {top['threads']} threads vs batch 1 on 1 thread: "
                 f"**{c['speedup_vs_1_thread_batch_1']:.2f}x** pairs/s (target >= {c['target']}x: {ok}).")
    return lines


# ------------------------------------------------------------------------------------------- seams
def seam_check(pipe, device, dtype: str) -> dict[str, Any]:
    """Tiled vs whole decode of random latents, the longest latent axis cut into tiles of half its length.

    The halo is the default (4) where the axis leaves room for it, else as large as keeps each tile's
    decoded region smaller than the axis (otherwise every tile would see the whole volume).
    """
    from duodiff.decoding import DEFAULT_HALO, DEFAULT_OVERLAP, decode, seam_report

    out: dict[str, Any] = {}
    g = torch.Generator().manual_seed(7)
    mem = Memory(device)
    for kind, ae, shape, scale in (
        ("label", pipe.label_autoencoder, pipe.config.label_latent_shape, pipe.config.label_scale_factor),
        ("image", pipe.image_autoencoder, pipe.config.image_latent_shape, pipe.config.image_scale_factor),
    ):
        z = (torch.randn((1, *shape), generator=g) / scale).to(pipe.device)
        sides = list(shape[1:])
        axis = max(range(3), key=lambda i: sides[i])
        length = sides[axis]
        sides[axis] = math.ceil(length / 2)
        tile = tuple(sides)
        halo = max(0, min(DEFAULT_HALO, (length - sides[axis]) // 2 - 1))
        with autocast(device, dtype):
            rep = seam_report(ae, z, tile_size=tile, halo=halo, kind=kind)
            with torch.inference_mode():
                _, t_whole, m_whole = timed(device, mem, lambda a=ae, z=z: decode(a, z, tile_size=None))
                _, t_tiled, m_tiled = timed(device, mem, lambda a=ae, z=z, t=tile, h=halo: decode(
                    a, z, tile_size=t, halo=h))
        out[kind] = {**rep.to_dict(), "whole_s": t_whole, "tiled_s": t_tiled, "whole_peak": m_whole,
                     "tiled_peak": m_tiled, "latent_shape": list(shape[1:]), "dtype": dtype,
                     "overlap_default": DEFAULT_OVERLAP, "halo_default": DEFAULT_HALO}
    return out


# ------------------------------------------------------------------------------------------- report
def environment(device: torch.device) -> dict[str, Any]:
    import monai

    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "device": str(device), "torch": torch.__version__, "monai": monai.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    with contextlib.suppress(OSError):
        m = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        info["cpu"] = m.group(1).strip() if m else platform.processor()
    with contextlib.suppress(OSError, AttributeError):
        info["load_average_start"] = list(os.getloadavg())
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), cudnn_benchmark=torch.backends.cudnn.benchmark)
    return info


def fmt_bytes(n: float | None) -> str:
    return "-" if not n else f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]

    def loads(key: str) -> str:
        return " / ".join(f"{x:.2f}" for x in env[key]) if env.get(key) else "-"

    mem_kind = "CUDA max allocated" if env["device"].startswith("cuda") else "process peak RSS"
    lines = [
        f"# duodiff sampling benchmark ({env['device']})", "",
        f"{env.get('gpu') or env.get('cpu', '')}; torch {env['torch']}, MONAI {env['monai']}, "
        f"{env['torch_threads']} intra-op threads; {env['date']}.",
        f"Command: `{env['command']}`. Load average (1 / 5 / 15 min) at start: {loads('load_average_start')}, "
        f"at end: {loads('load_average_end')} (the run's own load included).", "",
        "Seconds per batch (fastest of `--repeats` runs); `*` = long loop timed on its first `measured_steps` "
        "steps and extrapolated per step (decode times measured once per preset/dtype/batch). "
        f"Peak memory: {mem_kind}, the largest of the four stages.", "",
        "| preset | weights | dtype | sampler | batch | label denoise | label decode | image denoise | image decode "
        "| latency | pairs/s | peak memory |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        star = "*" if r["extrapolated"] else ""
        lines.append(
            f"| {r['preset']} {r['volume_shape']} | {r['weights'].split(' ')[0]} | {SHORT[r['dtype']]} | "
            f"{r['sampler']}{star} | {r['batch']} | {r['label_denoise_s']:.2f} | {r['label_decode_s']:.2f} | "
            f"{r['image_denoise_s']:.2f} | {r['image_decode_s']:.2f} | {r['latency_s']:.2f} | "
            f"{r['pairs_per_s']:.3f} | {fmt_bytes(r['peak_memory'])} |")
    if result["baselines"]:
        lines += ["", "## MONAI baseline (LatentDiffusionInferer + ControlNet inferer loop, DDPM-1000, fp32)", "",
                  "| preset | batch | label stage s | image stage s | latency s | pairs/s | measured steps |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for b in result["baselines"]:
            ex = " (extrapolated)" if b["extrapolated"] else ""
            lines.append(f"| {b['preset']} | {b['batch']} | {b['label_total_s']:.1f} | {b['image_total_s']:.1f} | "
                         f"{b['latency_s']:.1f} | {b['pairs_per_s']:.4f} | {b['measured_steps']}{ex} |")
    if result["ratios"]:
        lines += ["", "## Speed-ups (latency ratios, same run)", ""]
        for r in result["ratios"]:
            verdict = "" if r.get("target") is None else (
                f" (target >= {r['target']}x: {'met' if r['value'] >= r['target'] else 'NOT met'})")
            lines.append(f"- {r['name']}: **{r['value']:.1f}x**{verdict}")
    if result.get("parity"):
        p = result["parity"]
        if "skipped" in p:
            lines += ["", f"## Quality parity: skipped ({p['skipped']})"]
        else:
            lines += ["", f"## Quality parity ({p['num_samples']} label maps each)", "",
                      "| class | " + " | ".join([p["fast"], p["baseline"], "relative difference"]) + " |",
                      "|---|---:|---:|---:|"]
            for i, name in enumerate(p["label_names"][1:]):
                fs, bs = p["fast_stats"], p["baseline_stats"]
                lines.append(f"| {name} | {fs['mean_voxels'][i + 1]:.0f} +- {fs['std_voxels'][i + 1]:.0f} | "
                             f"{bs['mean_voxels'][i + 1]:.0f} +- {bs['std_voxels'][i + 1]:.0f} | "
                             f"{p['relative_difference'][i]:.1%} |")
            lines.append(f"\nMean foreground volumes (voxels) within 10 %: **{p['passes_10_percent']}** "
                         f"(max difference {p['max_relative_difference']:.1%}).")
    if result.get("seams"):
        lines += ["", "## Tiled vs whole VAE decode", "",
                  "| preset | stage | latent | tile | overlap | halo | mean abs diff | max abs diff | PSNR dB | "
                  "label agreement | whole s | tiled s | whole peak | tiled peak |",
                  "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for preset, s in result["seams"].items():
            for kind, r in s.items():
                psnr = "-" if r["psnr_db"] is None else f"{r['psnr_db']:.1f}"
                agree = "-" if r["label_agreement"] is None else f"{r['label_agreement']:.4f}"
                lines.append(
                    f"| {preset} | {kind} | {tuple(r['latent_shape'])} | {tuple(r['tile_size'])} | {r['overlap']} | "
                    f"{r['halo']} | {r['mean_abs_diff']:.4f} | {r['max_abs_diff']:.3f} | {psnr} | {agree} | "
                    f"{r['whole_s']:.2f} | {r['tiled_s']:.2f} | {fmt_bytes(r['whole_peak'])} | "
                    f"{fmt_bytes(r['tiled_peak'])} |")
    if result.get("dtype_table"):
        lines += markdown_dtype_table(result["dtype_table"])
    if result.get("sweep"):
        lines += markdown_sweep(result["sweep"], result["sweep"]["label_names"])
    if result.get("cores"):
        lines += markdown_cores(result["cores"])
    if result.get("load_check"):
        rows = result["load_check"]
        idle = next((r["wall_s"] for r in rows if r["competitors"] == 0), None)
        lines += ["", "## Busy machine: `duodiff sample` with default settings beside busy loops", "",
                  "| competing busy loops | wall s | vs idle | what it announced |", "|---:|---:|---:|---|"]
        for r in rows:
            ratio = f"{r['wall_s'] / idle:.2f}x" if idle else "-"
            lines.append(f"| {r['competitors']} | {r['wall_s']:.1f} | {ratio} | {r['announce']} |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    presets = sorted({r["preset"] for r in rows}, key=lambda p: [r["preset"] for r in rows].index(p))
    fig, axes = plt.subplots(1, len(presets), figsize=(6.5 * len(presets), 4.5), squeeze=False)
    for ax, preset in zip(axes[0], presets):
        sub = [r for r in rows if r["preset"] == preset]
        labels = [f"{r['sampler']}{'*' if r['extrapolated'] else ''}\n{SHORT[r['dtype']]} B{r['batch']}" for r in sub]
        stages = [("label_denoise_s", "label denoise"), ("label_decode_s", "label decode"),
                  ("image_denoise_s", "image denoise"), ("image_decode_s", "image decode")]
        bottom = [0.0] * len(sub)
        for key, name in stages:
            vals = [r[key] / r["batch"] for r in sub]
            ax.bar(range(len(sub)), vals, bottom=bottom, label=name)
            bottom = [b + v for b, v in zip(bottom, vals)]
        for b in result["baselines"]:
            if b["preset"] == preset:
                ax.axhline(b["latency_s"] / b["batch"], color="k", ls="--", lw=1,
                           label=f"MONAI DDPM-1000 fp32 B{b['batch']}")
        ax.set_yscale("log")
        ax.set_xticks(range(len(sub)), labels, fontsize=7)
        ax.set_ylabel("seconds per pair (log)")
        ax.set_title(f"{preset} {sub[0]['volume_shape']} ({sub[0]['weights'].split(' ')[0]} weights)")
        ax.legend(fontsize=7)
    env = result["environment"]
    fig.suptitle(f"duodiff sampling, {env.get('gpu') or env.get('cpu', env['device'])}, torch {env['torch']}, "
                 f"{env['torch_threads']} threads (* extrapolated)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------- main
def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def parse_args(argv: Sequence[str] | None, prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--preset", nargs="+", default=["hippocampus", "paper"], choices=["hippocampus", "paper"])
    p.add_argument("--dtypes", nargs="+", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: float32 + bfloat16 on CPU, float32 + float16 on CUDA")
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    p.add_argument("--batch-sizes", nargs="+", type=int, default=None,
                   help="default: 1 4 (hippocampus) and 1 (paper) on CPU; 1 4 8 on CUDA")
    p.add_argument("--max-steps", type=int, default=None,
                   help="time at most this many steps of a loop and extrapolate (default CPU: 50 for hippocampus, "
                        "2 for paper; CUDA: all)")
    p.add_argument("--baseline-steps", type=int, default=None,
                   help="MONAI DDPM steps actually run (rest extrapolated; default CPU: 250 hippocampus / 2 paper; "
                        "CUDA 1000); 0 skips the baseline")
    p.add_argument("--repeats", type=int, default=None,
                   help="time each duodiff config of <= 100 measured steps this many times and keep the fastest "
                        "(default 2; 1 for paper on CPU); longer loops, the MONAI baseline and parity run once")
    p.add_argument("--model", default=None,
                   help="trained model for the hippocampus rows and the parity check (default: the bundled model "
                        "if installed; 'none' forces random weights)")
    p.add_argument("--parity-samples", type=int, default=16, help="label maps per sampler for parity (0 skips)")
    p.add_argument("--no-seams", action="store_true", help="skip the tiled-vs-whole decode check")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch intra-op threads (default: torch's default, all cores); 1 is steadier on a "
                        "machine shared with other jobs")
    p.add_argument("--parts", nargs="+", default=["timing", "sweep", "dtypes"],
                   choices=["timing", "sweep", "dtypes", "load", "cores"],
                   help="what to run: timing (the stage table, baseline, parity, seams), sweep (quality vs steps), "
                        "dtypes (fp32 / low precision / auto per stage), load (duodiff sample -n 4 beside 0 and 1 "
                        "busy loops; wants an otherwise idle machine), cores (pairs/s of batch 1/4/8 on 1 thread "
                        "and on all threads; wants an idle machine). Default: timing sweep dtypes")
    p.add_argument("--sweep-samplers", nargs="+", default=list(SWEEP_SAMPLERS), choices=list(SWEEP_SAMPLERS))
    p.add_argument("--sweep-steps", nargs="+", type=positive_int, default=list(SWEEP_STEPS))
    p.add_argument("--sweep-samples", type=positive_int, default=32, help="pairs per sweep row (default 32)")
    p.add_argument("--sweep-batch", type=positive_int, default=8, help="batch size of the sweep (default 8)")
    p.add_argument("--sweep-reference-steps", type=positive_int, default=50, help="DDIM steps of the reference")
    p.add_argument("--sweep-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--sweep-seed", type=int, default=2000, help="first seed of the sweep's pairs")
    p.add_argument("--segmenter", default=None, metavar="DIR",
                   help="pair-consistency segmenter (default docs/results/evaluate, written by duodiff evaluate); "
                        "its encoder is the FID-2.5D feature network")
    p.add_argument("--real", default=None, metavar="DIR",
                   help="real pairs (MSD / nnU-Net folder) for FID-2.5D; default: an independent DDIM reference set")
    p.add_argument("--dtype-table-steps", type=positive_int, default=50, help="DDIM steps of the dtype table")
    p.add_argument("--load-check-steps", type=positive_int, default=None,
                   help="--steps of the load check's duodiff sample (default: none given, the library default)")
    p.add_argument("--load-check-samples", type=positive_int, default=4)
    p.add_argument("--cores-steps", type=positive_int, default=20, help="DDIM steps of the cores check")
    p.add_argument("--cores-batches", nargs="+", type=positive_int, default=[1, 4, 8])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: hippocampus, batch 1, 3 steps, no parity; sweep of 2 pairs at 2 and 4 steps "
                        "against DDIM-8; dtype table at 3 steps")
    p.add_argument("--report", default=None, metavar="JSON",
                   help="measure nothing: recompute the default rule and ratios of a saved run's JSON and rewrite "
                        "its .md/.png next to it")
    p.add_argument("--out", default=None, help="output prefix (default benchmarks/results/bench_sampling_<device>)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run the benchmark; ``prog`` names the command in usage lines (``duodiff bench`` when run through it)."""
    args = parse_args(argv, prog)
    if args.report:
        return rewrite_report(Path(args.report))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda but torch.cuda.is_available() is False")
        torch.backends.cudnn.benchmark = True
    kind = "cuda" if device.type == "cuda" else "cpu"
    dtypes = args.dtypes or ["float32", LOW_PRECISION[kind]]
    low = LOW_PRECISION[kind] if LOW_PRECISION[kind] in dtypes else next((d for d in dtypes if d != "float32"), None)
    if args.quick:
        args.preset, args.parity_samples, args.no_seams = ["hippocampus"], 0, True
        args.batch_sizes, args.max_steps, args.baseline_steps, args.repeats = [1], 3, 3, 1
        args.sweep_steps, args.sweep_samples, args.sweep_batch, args.sweep_reference_steps = [2, 4], 2, 2, 8
        args.dtype_table_steps, args.load_check_steps, args.load_check_samples = 3, 3, 1
        args.cores_steps, args.cores_batches = 2, [1, 2]
    args.trained = find_trained_model(args.model)
    out_prefix = Path(args.out) if args.out else RESULTS / f"bench_sampling_{kind}"
    out_prefix.parent.mkdir(parents=True, exist_ok=True)

    def setting(preset: str, name: str):
        given = getattr(args, name)
        if given is not None:
            return given
        defaults = {
            ("cpu", "hippocampus"): {"batch_sizes": [1, 4], "max_steps": 50, "baseline_steps": 250, "repeats": 2},
            ("cpu", "paper"): {"batch_sizes": [1], "max_steps": 2, "baseline_steps": 2, "repeats": 1},
            ("cuda", "hippocampus"): {"batch_sizes": [1, 4, 8], "max_steps": 1000, "baseline_steps": 1000,
                                      "repeats": 2},
            ("cuda", "paper"): {"batch_sizes": [1, 4, 8], "max_steps": 1000, "baseline_steps": 1000, "repeats": 2},
        }
        return defaults[(kind, preset)][name]

    env = environment(device)
    print(f"# {env.get('gpu') or env.get('cpu')} | torch {env['torch']} | threads {env['torch_threads']} | "
          f"trained model: {args.trained and shown(args.trained)}", flush=True)
    pipes = load_pipelines(args, device)
    mem = Memory(device)
    result: dict[str, Any] = {"environment": env, "rows": [], "baselines": [], "ratios": [], "parity": None,
                              "seams": {}}
    t_start = time.perf_counter()
    for preset, (pipe, weights) in (pipes.items() if "timing" in args.parts else ()):
        shape = "x".join(map(str, pipe.config.volume_shape))
        for batch in setting(preset, "batch_sizes"):
            for dtype in dtypes:
                warm_up(pipe, device, dtype, batch)
                decoded = None
                for sampler_key in args.samplers:
                    name, steps = SAMPLERS[sampler_key]
                    max_steps = setting(preset, "max_steps")
                    reps = setting(preset, "repeats") if min(steps, max_steps) <= 100 else 1  # long loops: once
                    den, zl, zi = best_of(reps, partial(duodiff_denoise, pipe, device, mem, dtype, name,
                                                                 steps, batch, max_steps))
                    if decoded is None:  # decode cost does not depend on the sampler
                        decoded = best_of(setting(preset, "repeats"), partial(duodiff_decode, pipe, device, mem,
                                                                              dtype, zl, zi))[0]
                    row = {"preset": preset, "volume_shape": shape, "weights": weights, "dtype": dtype,
                           "sampler": sampler_key, "steps": steps, "batch": batch, **den, **decoded,
                           "extrapolated": den["measured_steps"] < steps}
                    row["latency_s"] = sum(row[k] for k in ("label_denoise_s", "label_decode_s", "image_denoise_s",
                                                            "image_decode_s"))
                    row["pairs_per_s"] = batch / row["latency_s"]
                    row["peak_memory"] = max(row[k] for k in row if k.endswith("_peak"))
                    result["rows"].append(row)
                    star = "*" if row["extrapolated"] else " "
                    print(f"{preset:11s} {SHORT[dtype]} {sampler_key:9s}{star} B{batch}: "
                          f"{row['latency_s']:8.2f} s/batch  {row['pairs_per_s']:7.3f} pairs/s  "
                          f"peak {fmt_bytes(row['peak_memory'])}  [{time.perf_counter() - t_start:.0f}s]", flush=True)
        bsteps = setting(preset, "baseline_steps")
        if bsteps:
            b = monai_baseline(pipe, device, mem, min(bsteps, 1000), 1)
            b.update(preset=preset, batch=1, volume_shape=shape)
            result["baselines"].append(b)
            how = f" (extrapolated from {bsteps} steps)" if b["extrapolated"] else ""
            print(f"{preset:11s} MONAI DDPM-1000 fp32 B1{how}: {b['latency_s']:.1f} s/pair  "
                  f"[{time.perf_counter() - t_start:.0f}s]", flush=True)
        if not args.no_seams:
            result["seams"][preset] = seam_check(pipe, device, "float32")
            for k, r in result["seams"][preset].items():
                print(f"{preset:11s} tiled {k} decode {tuple(r['tile_size'])}: mean |diff| {r['mean_abs_diff']:.4f}, "
                      f"max {r['max_abs_diff']:.3f}, agreement {r['label_agreement']}, psnr {r['psnr_db']}", flush=True)

    # speed-up ratios (batch 1 latency)
    def find(preset, dtype, sampler, batch=1):
        return next((r for r in result["rows"] if (r["preset"], r["dtype"], r["sampler"], r["batch"])
                     == (preset, dtype, sampler, batch)), None)

    for b in result["baselines"]:
        fast = find(b["preset"], low, "ddim-50") if low else None
        if fast:
            result["ratios"].append({
                "name": f"{b['preset']}: duodiff DDIM-50 {SHORT[low]} vs MONAI DDPM-1000 fp32 (batch 1)",
                "value": b["latency_s"] / fast["latency_s"], "target": 20 if b["preset"] == "hippocampus" else None,
                "baseline_extrapolated": b["extrapolated"]})
    for preset in pipes:
        for batch in setting(preset, "batch_sizes"):
            f32, lp = find(preset, "float32", "ddim-50", batch), find(preset, low, "ddim-50", batch) if low else None
            if f32 and lp:
                result["ratios"].append({
                    "name": f"{preset}: DDIM-50 {SHORT[low]} vs fp32 (batch {batch})",
                    "value": f32["latency_s"] / lp["latency_s"],
                    "target": 1.7 if (preset == "hippocampus" and batch == 1 and kind == "cpu") else None})
    # parity on a trained model
    parity_wanted = "timing" in args.parts and args.parity_samples
    if parity_wanted and "hippocampus" in pipes and args.trained and low:
        print(f"parity: {args.parity_samples} label maps, DDIM-50 {SHORT[low]} vs MONAI DDPM-1000 fp32 ...", flush=True)
        result["parity"] = parity(pipes["hippocampus"][0], device, low, args.parity_samples)
    elif parity_wanted:
        result["parity"] = {"skipped": "no trained model (pass --model or install the bundled one)"
                            if not args.trained else "hippocampus preset not benchmarked"}
    main_pipe, main_weights = pipes[args.preset[0]]
    if "dtypes" in args.parts:
        print(f"dtype table: DDIM-{args.dtype_table_steps}, batch 1, {', '.join(dtypes)} and auto ...", flush=True)
        result["dtype_table"] = dtype_table(main_pipe, device, dtypes, args.dtype_table_steps,
                                            setting(args.preset[0], "repeats"))
        for r in result["dtype_table"]["rows"]:
            print(f"dtype table: {r['dtype']:9s} ({r['resolved']}): {r['latency_s']:.2f} s per pair", flush=True)
    if "sweep" in args.parts:
        if not args.trained:
            print("sweep: no trained model: quality numbers of random weights mean nothing", flush=True)
        result["sweep"] = quality_sweep(main_pipe, args, device,
                                        (result.get("dtype_table") or {}).get("auto_dtype"))
        result["sweep"].update(preset=args.preset[0], weights=main_weights,
                               label_names=list(main_pipe.config.label_names))
        result["ratios"] += sweep_ratios(result)
    if "cores" in args.parts:
        cdtype = (result.get("dtype_table") or {}).get("auto_dtype") or low or "float32"
        result["cores"] = cores_check(main_pipe, args.cores_steps, cdtype, args.cores_batches,
                                      setting(args.preset[0], "repeats"))
    if "load" in args.parts:
        result["load_check"] = load_check(args.trained, args.load_check_steps, args.load_check_samples, (0, 1))
    with contextlib.suppress(OSError, AttributeError):
        env["load_average_end"] = list(os.getloadavg())
    env["wall_seconds"] = time.perf_counter() - t_start

    write_outputs(result, out_prefix)
    return 0


def write_outputs(result: dict[str, Any], out_prefix: Path) -> None:
    """Write ``<out_prefix>.json/.md/.png`` (and ``_sweep.png``) and print the summary lines."""
    env = result["environment"]
    out_prefix.with_suffix(".json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    out_prefix.with_suffix(".md").write_text(markdown(result))
    if result["rows"]:
        plot(result, out_prefix.with_suffix(".png"))
    if result.get("sweep"):
        plot_sweep(result["sweep"], Path(f"{out_prefix}_sweep.png"),
                   f"duodiff quality vs seconds per pair, {env.get('gpu') or env.get('cpu', env['device'])}, "
                   f"{result['sweep']['dtype']}, {result['sweep']['weights'].split(' ')[0]} weights")
    print()
    for r in result["ratios"]:
        verdict = "" if r["target"] is None else f"  (target >= {r['target']}x: " \
            f"{'met' if r['value'] >= r['target'] else 'NOT met'})"
        print(f"SPEED-UP {r['name']}: {r['value']:.1f}x{verdict}")
    if result["parity"]:
        p = result["parity"]
        print("PARITY " + (f"skipped: {p['skipped']}" if "skipped" in p else
                           f"max relative difference of mean class volumes {p['max_relative_difference']:.1%} "
                           f"(within 10 %: {p['passes_10_percent']})"))
    if result.get("dtype_table"):
        t = result["dtype_table"]
        print(f"DTYPE auto chose {t['auto_dtype']}: {t['auto_vs_best_fixed']:.2f}x the best fixed dtype "
              f"({t['best_fixed']}; target <= 1.05)")
    if result.get("cores"):
        c = result["cores"]
        print(f"CORES batch {c['best_all_threads']['batch']} on {c['best_all_threads']['threads']} threads vs batch 1 "
              f"on 1 thread: {c['speedup_vs_1_thread_batch_1']:.2f}x pairs/s (target >= {c['target']}x)")
    if (result.get("sweep") or {}).get("default_rule"):
        r = result["sweep"]["default_rule"]
        print(f"DEFAULT by the rule: {r['sampler']}-{r['steps']} (equal quality from {r['stable_from']} steps on)")
    if result.get("sweep"):
        best = result["sweep"]["fastest_equal_quality"]
        print("SWEEP fastest at equal quality: " + ("none" if best is None else
              f"{best['sampler']}-{best['steps']} ({best['seconds_per_pair']:.2f} s/pair, "
              f"{best['speedup_vs_reference']:.1f}x {result['sweep']['reference_sampler']})"))
    print(f"wrote {out_prefix}.json/.md" + ("/.png" if result["rows"] else "")
          + (f" and {out_prefix}_sweep.png" if result.get("sweep") else "") + f" in {env['wall_seconds']:.0f} s")


def rewrite_report(path: Path) -> int:
    """``--report JSON``: recompute the sweep's default rule and ratios of a saved run and rewrite its reports."""
    from duodiff.schedulers import DIFFUSERS_SAMPLERS

    result = json.loads(path.read_text())
    if result.get("sweep"):
        sweep = result["sweep"]
        core = [s for s in dict.fromkeys(r["sampler"] for r in sweep["rows"]) if s not in DIFFUSERS_SAMPLERS]
        sweep["default_rule"] = default_rule(sweep, core)
        ours = ("fastest sweep row at equal quality", "default by the rule")
        result["ratios"] = [r for r in result["ratios"] if not any(o in r["name"] for o in ours)] \
            + sweep_ratios(result)
    write_outputs(result, path.with_suffix(""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

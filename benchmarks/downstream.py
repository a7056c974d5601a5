"""Downstream segmentation with synthetic pairs: the FOSCU Table II experiment on MSD Hippocampus.

Trains MONAI segmentation networks (``UNet``, ``DynUNet``, ``VNet``) in data-scarce regimes (``n`` real
training cases) under three conditions, and measures Dice on the held-out test cases of the fixed split:

* ``real``: the ``n`` real cases only;
* ``mix<f>``: real + synthetic pairs mixed by :class:`duodiff.MixedBatchSampler`, a share ``f`` of every
  batch synthetic (one run per fraction in ``--fractions``);
* ``synth``: synthetic pairs only (does not depend on ``n``; run once per network and seed).

Every run has the same number of optimiser steps and the same batch size, so conditions differ only in
what the batches hold. Real volumes are preprocessed exactly as for training the generator
(:func:`duodiff.train.data.preprocess_case`: RAS, the model's recorded percentile clip (0.5/99.5 for models saved
before it was recorded) to [0, 1], crop/pad to the
model's ``volume_shape`` around the label centroid). Test cases are only ever used for evaluation.

Seeds: seed ``s`` picks the real subset (the first ``n`` of a ``numpy.random.default_rng(s)`` permutation
of the train cases, so the 10-case subset is inside the 40-case one), the network initialisation
(inside ``torch.random.fork_rng``, so the global RNG is untouched) and the batch order. ``real`` and
``mix<f>`` runs of one seed therefore share subset and initialisation: improvements are paired.

A pool of synthetic pairs is generated once (NIfTI in nnU-Net naming, ``<pool>/imagesTr``,
``<pool>/labelsTr``, read back with :meth:`duodiff.SyntheticPairDataset.from_folder`) and reused by all
runs; generation resumes where it stopped. Results go to a JSON file after every run; running the same
command again skips finished runs (an interrupted run resumes), then writes the Markdown table and plot.

    python benchmarks/downstream.py --model src/duodiff/weights/hippocampus \
        --data ../shared/data/msd_hippocampus --split examples/hippocampus/split.json \
        --networks unet --regimes 10 --seeds 0 1 2 --fractions 0.5 --steps 400 \
        --out benchmarks/results/downstream_hippocampus.json

``--quick`` is a 1-minute sanity run (UNet, 10 cases, 1 seed, 20 steps, 8 synthetic pairs).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
NETWORKS = ("unet", "dynunet", "vnet")
REAL, SYNTH = "real", "synth"
FORMAT = "duodiff-downstream-v1"

# Settings that change the numbers of a run; a results file only holds runs made with one set of them.
RESULT_SETTINGS = ("steps", "batch_size", "lr", "weight_decay", "amp", "num_synthetic", "synthetic_seed",
                   "gen_steps", "gen_dtype", "model", "data", "split", "volume_shape", "min_real_per_batch",
                   "vnet_dropout")


# ============================================================================================ data
def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def model_id(model: str) -> str:
    """A short id of a model folder: digest of its ``model_index.json`` and weight files."""
    folder = Path(model)
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and (p.suffix in (".json", ".safetensors")):
            h.update(str(p.relative_to(folder)).encode())
            h.update(_file_digest(p).encode())
    return h.hexdigest()[:16]


def load_model(model: str | os.PathLike):
    """A :class:`duodiff.DuoDiffusion` from a folder: the ``fp16`` variant when the folder only has that one
    (as the bundled model)."""
    import duodiff

    folder = Path(model)
    plain = list(folder.glob("*/model.safetensors"))
    variant = "fp16" if not plain and list(folder.glob("*/model.fp16.safetensors")) else None
    return duodiff.DuoDiffusion.from_pretrained(folder, variant=variant)


def load_real(data_root: str | os.PathLike, split_file: str | os.PathLike, volume_shape: Sequence[int],
              num_classes: int, *, cache_dir: str | os.PathLike | None = None,
              progress: bool = True, target_spacing: Sequence[float] = (),
              intensity_percentiles: Sequence[float] | None = None) -> dict[str, Any]:
    """Preprocess the train and test cases of the split exactly as training does (cached as ``.npz``).

    ``target_spacing`` (mm): resample first, for models trained with ``target_spacing`` (the liver example).
    ``intensity_percentiles``: the model's recorded ``config.intensity_percentiles`` (``None``: 0.5 / 99.5).

    Returns:
        dict with ``train_images``/``test_images`` float32 ``(N, 1, H, W, D)`` in [0, 1],
        ``train_labels``/``test_labels`` uint8 ``(N, 1, H, W, D)`` in ``0..K-1`` and the case names.
    """
    from duodiff.train.data import load_split_cases, read_split

    split = read_split(split_file)
    if not split.get("test"):
        raise ValueError(f"Split file {str(split_file)!r} has no 'test' cases to evaluate on.")
    shape = [int(s) for s in volume_shape]
    spec = {"root": str(Path(data_root).resolve()), "split": split, "shape": shape, "classes": num_classes, "v": 1}
    if target_spacing:
        spec["spacing"] = [float(v) for v in target_spacing]
    if intensity_percentiles is not None and tuple(intensity_percentiles) != (0.5, 99.5):
        spec["percentiles"] = [float(v) for v in intensity_percentiles]  # the default keeps earlier cache keys
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"real-{key}.npz" if cache_dir is not None else None
    if cache is not None and cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            return {k: (z[k].tolist() if k.endswith("names") else torch.from_numpy(z[k])) for k in z.files}
    out: dict[str, Any] = {}
    for subset in ("train", "test"):
        images, labels, names = load_split_cases(data_root, split_file, subset, shape, num_classes,
                                                 target_spacing=target_spacing,
                                                 intensity_percentiles=intensity_percentiles, progress=progress)
        out[f"{subset}_images"], out[f"{subset}_labels"], out[f"{subset}_names"] = images, labels, names
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **{k: (np.array(v, dtype=str) if k.endswith("names") else v.numpy()) for k, v in out.items()})
        tmp.replace(cache)
    return out


def real_subset(num_train: int, n: int, seed: int) -> list[int]:
    """Indices of the ``n`` real training cases of seed ``seed`` (nested: the 10 of a seed are in its 40)."""
    if not 1 <= n <= num_train:
        raise ValueError(f"A regime of {n} real cases is not possible with {num_train} training cases; "
                         f"use 1..{num_train}.")
    return np.random.default_rng(seed).permutation(num_train)[:n].tolist()


def synthetic_pool(model: str | os.PathLike | None, folder: str | os.PathLike, num: int, *, seed: int = 100_000,
                   num_inference_steps: int = 50, dtype: str | None = "bfloat16", chunk: int = 16,
                   progress: bool = True) -> tuple[Path, float]:
    """Generate (or finish generating) ``num`` pairs with seeds ``seed .. seed+num-1`` into ``folder``.

    Pairs already in ``folder`` are kept; a ``pool.json`` records model and settings and must match.

    Returns:
        the folder and the seconds spent generating in this call.
    """
    from tqdm.auto import tqdm

    import duodiff
    from duodiff.output import sample_name

    folder = Path(folder)
    model_path = Path(model) if model is not None else duodiff.bundled.bundled_model_path()
    meta = {"format": FORMAT, "model": model_id(str(model_path)), "seed": int(seed),
            "num_inference_steps": int(num_inference_steps), "dtype": dtype}
    meta_file = folder / "pool.json"
    if meta_file.is_file():
        old = json.loads(meta_file.read_text())
        if old != meta:
            raise ValueError(f"Synthetic pool {str(folder)!r} was made with other settings ({old}, now {meta}). "
                             "Pass another --synthetic-dir or delete that folder.")
    folder.mkdir(parents=True, exist_ok=True)
    meta_file.write_text(json.dumps(meta, indent=2, sort_keys=True))
    labels_dir = folder / "labelsTr"
    have = {p.name.split(".")[0] for p in labels_dir.glob("*.nii.gz")} if labels_dir.is_dir() else set()
    todo = [s for s in range(seed, seed + num) if sample_name(s) not in have]
    if not todo:
        return folder, 0.0
    pipe = load_model(model_path)
    t0 = time.perf_counter()
    with tqdm(total=num, initial=num - len(todo), desc="synthetic pairs", disable=not progress) as bar:
        for i in range(0, len(todo), chunk):
            seeds = todo[i:i + chunk]
            out = pipe.sample(len(seeds), seed=seeds, num_inference_steps=num_inference_steps, dtype=dtype,
                              progress=False)
            out.save(folder)
            bar.update(len(seeds))
    return folder, time.perf_counter() - t0


def load_pool(folder: str | os.PathLike, num: int, seed: int) -> list[dict[str, Any]]:
    """The first ``num`` pool pairs as in-memory dicts (image float32 ``(1, H, W, D)``, label uint8)."""
    from duodiff import SyntheticPairDataset

    ds = SyntheticPairDataset.from_folder(folder)
    wanted = {seed + i for i in range(num)}
    items = []
    for i in range(len(ds)):
        item = ds[i]
        if item["seed"] in wanted:
            items.append({"image": item["image"].as_tensor().float(),
                          "label": item["label"].as_tensor().to(torch.uint8),
                          "is_synthetic": True, "seed": int(item["seed"])})
    if len(items) != num:
        raise ValueError(f"Synthetic pool {str(folder)!r} holds {len(items)} of the {num} pairs requested.")
    return items


def as_items(images: torch.Tensor, labels: torch.Tensor) -> list[dict[str, Any]]:
    """Real arrays as data-layer items (``duodiff.data.mark_real`` adds ``is_synthetic=False``)."""
    from duodiff.data import mark_real

    return [mark_real({"image": images[i].float(), "label": labels[i].to(torch.uint8)}) for i in range(len(images))]


# ============================================================================================ batches
def _cycled(num: int, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Endless batches of indices: shuffled passes over ``range(num)`` joined end to end."""
    buf: list[int] = []
    while True:
        while len(buf) < batch_size:
            buf += torch.randperm(num, generator=generator).tolist()
        yield buf[:batch_size]
        buf = buf[batch_size:]


def batches(condition: str, real: list[dict], synthetic: list[dict], *, batch_size: int, seed: int,
            min_real_per_batch: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Endless training batches for a condition (``"real"``, ``"synth"`` or ``"mix<f>"``).

    Mixed batches come from :class:`duodiff.MixedBatchSampler` over ``ConcatDataset([real, synthetic])``:
    ``round_half_up(f * batch_size)`` synthetic samples per batch, epochs over the real cases.
    """
    from torch.utils.data import ConcatDataset, DataLoader, default_collate

    from duodiff import MixedBatchSampler

    g = torch.Generator().manual_seed(seed)
    if condition in (REAL, SYNTH):
        data = real if condition == REAL else synthetic
        if not data:
            raise ValueError(f"Condition {condition!r} has no samples.")
        for idx in _cycled(len(data), batch_size, g):
            yield default_collate([data[i] for i in idx])
    fraction = parse_condition(condition)
    sampler = MixedBatchSampler(ConcatDataset([real, synthetic]), batch_size, synthetic_fraction=fraction,
                                min_real_per_batch=min_real_per_batch, drop_last=True, seed=seed)
    if len(sampler) == 0:
        raise ValueError(f"{len(real)} real cases give no full batch of {batch_size} at fraction {fraction}.")
    loader = DataLoader(ConcatDataset([real, synthetic]), batch_sampler=sampler, num_workers=0)
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def parse_condition(condition: str) -> float:
    """The synthetic fraction of a condition: ``real`` 0, ``synth`` 1, ``mix0.5`` 0.5."""
    if condition == REAL:
        return 0.0
    if condition == SYNTH:
        return 1.0
    if condition.startswith("mix"):
        f = float(condition[3:])
        if 0.0 < f < 1.0:
            return f
    raise ValueError(f"Unknown condition {condition!r}: use 'real', 'synth' or 'mix<f>' with 0 < f < 1.")


# ============================================================================================ networks
def build_network(name: str, *, in_channels: int, out_channels: int, volume_shape: Sequence[int],
                  vnet_dropout: float | None = None) -> nn.Module:
    """A MONAI segmentation network; checks that ``volume_shape`` suits it.

    ``vnet_dropout``: probability of every VNet dropout layer (``None``: MONAI's defaults, 0.5 each).
    """
    from monai.networks import nets

    need = {"unet": 8, "dynunet": 8, "vnet": 16}
    if name not in need:
        raise ValueError(f"Unknown network {name!r}; choose from {list(NETWORKS)}.")
    bad = [s for s in volume_shape if s % need[name]]
    if bad:
        raise ValueError(f"{name} needs volume sides divisible by {need[name]}, got {tuple(volume_shape)} "
                         "(e.g. 32 x 48 x 32).")
    if name == "unet":
        return nets.UNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels,
                         channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2, norm="instance")
    if name == "dynunet":
        return nets.DynUNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels,
                            kernel_size=[3, 3, 3, 3], strides=[1, 2, 2, 2], upsample_kernel_size=[2, 2, 2],
                            filters=[16, 32, 64, 128], norm_name="instance", res_block=True)
    net = nets.VNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels)
    if vnet_dropout is not None:  # VNet's constructor cannot reach the skip dropout of its two top up-blocks
        for m in net.modules():
            if isinstance(m, nn.modules.dropout._DropoutNd):
                m.p = float(vnet_dropout)
    return net


# ============================================================================================ train / eval
def _autocast(amp: str | None) -> contextlib.AbstractContextManager:
    if amp in (None, "none", "float32"):
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=getattr(torch, amp))


def train(net: nn.Module, data: Iterator[dict[str, torch.Tensor]], *, steps: int, lr: float,
          weight_decay: float = 1e-5, amp: str | None = None, progress: bool = True,
          desc: str = "train") -> dict[str, float]:
    """AdamW + cosine decay on DiceCE loss for ``steps`` batches; returns loss and synthetic share seen."""
    from monai.losses import DiceCELoss
    from tqdm.auto import tqdm

    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    net.train()
    losses, seen, synthetic = [], 0, 0
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for _ in bar:
        batch = next(data)
        image, label = batch["image"], batch["label"].long()
        flags = torch.as_tensor(batch["is_synthetic"])
        seen, synthetic = seen + len(flags), synthetic + int(flags.sum())
        with _autocast(amp):
            logits = net(image)
        loss = loss_fn(logits.float(), label)
        if not torch.isfinite(loss):  # a diverged run would otherwise be recorded as Dice 0
            raise FloatingPointError(f"{desc}: the loss became {loss.item()} at step {len(losses)} "
                                     f"(amp={amp!r}); use --amp none or a lower --lr.")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    tail = losses[-max(1, len(losses) // 10):]
    return {"final_loss": float(np.mean(tail)), "synthetic_share_seen": synthetic / max(seen, 1)}


@torch.no_grad()
def evaluate(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
             amp: str | None = None, batch_size: int = 4) -> dict[str, Any]:
    """Dice per class (MONAI ``DiceMetric``, background excluded) on whole volumes.

    Args:
        images: float32 ``(N, 1, H, W, D)`` in [0, 1]. labels: ``(N, 1, H, W, D)`` class ids.

    Returns:
        ``{"mean": float, "per_class": [K-1 floats], "per_case": [[K-1 floats] * N]}``.
    """
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    net.eval()
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    for i in range(0, len(images), batch_size):
        with _autocast(amp):
            logits = net(images[i:i + batch_size].float())
        pred = logits.float().argmax(1, keepdim=True)
        metric(one_hot(pred, num_classes), one_hot(labels[i:i + batch_size].long(), num_classes))
    per_case = metric.aggregate()  # (N, K-1), nan where a class is absent from the reference
    per_class = torch.nanmean(per_case, 0)
    return {"mean": float(per_class.mean()), "per_class": per_class.tolist(), "per_case": per_case.tolist()}


def run_key(network: str, num_real: int, condition: str, seed: int) -> str:
    """Key of one run in the results file, e.g. ``unet/n10/mix0.5/s0``."""
    return f"{network}/n{num_real}/{condition}/s{seed}"


def run_one(network: str, condition: str, seed: int, real: list[dict], synthetic: list[dict],
            test_images: torch.Tensor, test_labels: torch.Tensor, *, num_classes: int, steps: int,
            batch_size: int, lr: float, weight_decay: float = 1e-5, amp: str | None = None,
            min_real_per_batch: int = 0, progress: bool = True,
            vnet_dropout: float | None = None) -> dict[str, Any]:
    """Train one network under one condition and evaluate it on the test arrays.

    The network is initialised (and dropout drawn) from ``seed`` inside ``torch.random.fork_rng``, so the
    caller's global RNG state is unchanged and the run does not depend on what ran before it.
    """
    t0 = time.perf_counter()
    shape = tuple(test_images.shape[2:])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_network(network, in_channels=int(test_images.shape[1]), out_channels=num_classes,
                            volume_shape=shape, vnet_dropout=vnet_dropout)
        data = batches(condition, real, synthetic, batch_size=batch_size, seed=seed,
                       min_real_per_batch=min_real_per_batch)
        stats = train(net, data, steps=steps, lr=lr, weight_decay=weight_decay, amp=amp, progress=progress,
                      desc=f"{network} {condition} s{seed}")
    dice = evaluate(net, test_images, test_labels, num_classes, amp=amp)
    return {"network": network, "num_real": len(real) if condition != SYNTH else 0, "condition": condition,
            "fraction": parse_condition(condition), "seed": seed, **dice, **stats,
            "num_parameters": sum(p.numel() for p in net.parameters()),
            "seconds": time.perf_counter() - t0}


# ============================================================================================ results file
def load_results(path: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The results file (new if absent); refuses one written with other settings."""
    if path.is_file():
        results = json.loads(path.read_text())
        if results.get("format") != FORMAT:
            raise ValueError(f"{str(path)!r} is not a downstream results file (format {results.get('format')!r}).")
        old = {k: results["settings"].get(k) for k in RESULT_SETTINGS}
        new = {k: settings.get(k) for k in RESULT_SETTINGS}
        diff = {k: (old[k], new[k]) for k in RESULT_SETTINGS if old[k] != new[k]}
        if diff:
            raise ValueError(f"{str(path)!r} holds runs made with other settings {diff} (old, new). Pass another "
                             "--out, or the same settings to resume.")
        return results
    return {"format": FORMAT, "settings": settings, "runs": {}, "sessions": []}


def save_results(path: Path, results: dict[str, Any]) -> None:
    """Write atomically (a killed process leaves the previous file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True))
    tmp.replace(path)


def plan(networks: Sequence[str], regimes: Sequence[int], seeds: Sequence[int], fractions: Sequence[float],
         *, synthetic_only: bool = True, real_only: bool = True) -> list[tuple[str, int, str, int]]:
    """Runs in priority order: per network, per regime, per seed: real, mixes; synthetic-only per seed."""
    runs = []
    for net in networks:
        for n in regimes:
            for s in seeds:
                if real_only:
                    runs.append((net, n, REAL, s))
                runs += [(net, n, f"mix{f:g}", s) for f in fractions]
        if synthetic_only:
            runs += [(net, 0, SYNTH, s) for s in seeds]
    return runs


# ============================================================================================ CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="Duo-Diffusion model folder (default: the bundled model)")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "msd_hippocampus"))
    ap.add_argument("--split", default=str(ROOT / "examples" / "hippocampus" / "split.json"))
    ap.add_argument("--networks", nargs="+", default=["unet"], choices=NETWORKS)
    ap.add_argument("--regimes", nargs="+", default=["10"],
                    help="real training cases per regime: numbers and/or 'all' (every train case of the split)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--fractions", nargs="*", type=float, default=[0.5],
                    help="synthetic share of each mixed batch (0 < f < 1); none: no mixed runs")
    ap.add_argument("--no-synthetic-only", action="store_true", help="skip the synthetic-only runs")
    ap.add_argument("--no-real-only", action="store_true", help="skip the real-only runs")
    ap.add_argument("--steps", type=int, default=400, help="optimiser steps per run")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=1e-5)
    ap.add_argument("--min-real-per-batch", type=int, default=0)
    ap.add_argument("--amp", default="none", choices=["none", "bfloat16"],
                    help="autocast dtype of the segmentation nets (bfloat16: ~1.7x faster DynUNet/VNet on CPU, but "
                         "not bit-reproducible and NaN-prone with instance norm on tiny bottlenecks)")
    ap.add_argument("--vnet-dropout", type=float, default=None,
                    help="probability of every VNet dropout layer (default: MONAI's, 0.5 each)")
    ap.add_argument("--num-synthetic", type=int, default=200, help="synthetic pairs in the pool")
    ap.add_argument("--synthetic-seed", type=int, default=100_000, help="seed of the first synthetic pair")
    ap.add_argument("--gen-steps", type=int, default=50, help="DDIM steps per stage for the synthetic pool")
    ap.add_argument("--gen-dtype", default="bfloat16", help="autocast dtype for generation ('none': float32)")
    ap.add_argument("--synthetic-dir", default=str(ROOT / "runs" / "downstream" / "synthetic"),
                    help="where the synthetic pool is written and reused")
    ap.add_argument("--cache-dir", default=str(ROOT / "runs" / "downstream" / "cache"),
                    help="cache of the preprocessed real arrays")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "downstream_hippocampus.json"),
                    help="results JSON; the .md table and .png plot are written beside it")
    ap.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs (resume later)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="tiny sanity run: unet, 10 cases, 1 seed, 20 steps")
    ap.add_argument("--resample", action="store_true",
                    help="resample real cases to the model's spacing (models trained with target_spacing, e.g. liver)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.networks, args.regimes, args.seeds = ["unet"], ["10"], [0]
        args.steps, args.num_synthetic, args.gen_steps = 20, 8, 10
        if args.out == ap.get_default("out"):
            args.out = str(ROOT / "runs" / "downstream" / "quick.json")
    for f in args.fractions:
        if not 0.0 < f < 1.0:
            ap.error(f"--fractions must be in (0, 1), got {f}; use --no-real-only / synthetic-only runs for 0 or 1.")
    if args.steps < 1 or args.batch_size < 1 or args.num_synthetic < 1:
        ap.error("--steps, --batch-size and --num-synthetic must be >= 1.")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = not args.no_progress
    import duodiff

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import downstream_report

    t_start = time.perf_counter()
    model = Path(args.model) if args.model else duodiff.bundled.bundled_model_path()
    config = load_model(model).config
    num_classes, shape = config.num_classes, tuple(config.volume_shape)
    real_data = load_real(args.data, args.split, shape, num_classes, cache_dir=args.cache_dir, progress=progress,
                          target_spacing=tuple(config.spacing) if args.resample else (),
                          intensity_percentiles=config.intensity_percentiles)
    num_train = len(real_data["train_names"])
    regimes = sorted({num_train if r == "all" else int(r) for r in args.regimes})
    gen_dtype = None if args.gen_dtype == "none" else args.gen_dtype
    settings = {
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay,
        "amp": args.amp, "num_synthetic": args.num_synthetic, "synthetic_seed": args.synthetic_seed,
        "gen_steps": args.gen_steps, "gen_dtype": gen_dtype, "model": model_id(str(model)),
        "model_path": str(model), "data": Path(args.data).name,
        "split": _file_digest(Path(args.split)), "volume_shape": list(shape),
        "min_real_per_batch": args.min_real_per_batch, "num_classes": num_classes,
        "label_names": list(config.label_names), "num_train_cases": num_train,
        "num_test_cases": len(real_data["test_names"]), "vnet_dropout": args.vnet_dropout,
    }
    out = Path(args.out)
    results = load_results(out, settings)
    session = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "argv": list(argv or sys.argv[1:]),
               "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
               "machine": platform.processor() or platform.machine(), "torch": torch.__version__}
    results["sessions"].append(session)

    todo = plan(args.networks, regimes, args.seeds, args.fractions, synthetic_only=not args.no_synthetic_only,
                real_only=not args.no_real_only)
    pending = [r for r in todo if run_key(*r) not in results["runs"]]
    synthetic: list[dict] = []
    if any(c != REAL for _, _, c, _ in pending):
        folder, gen_seconds = synthetic_pool(model, args.synthetic_dir, args.num_synthetic, seed=args.synthetic_seed,
                                             num_inference_steps=args.gen_steps, dtype=gen_dtype, progress=progress)
        session["generation_seconds"] = gen_seconds
        synthetic = load_pool(folder, args.num_synthetic, args.synthetic_seed)
    test_images, test_labels = real_data["test_images"], real_data["test_labels"]
    train_items = as_items(real_data["train_images"], real_data["train_labels"])
    done = 0
    for net, n, cond, seed in todo:
        key = run_key(net, n, cond, seed)
        if key in results["runs"]:
            continue
        if args.max_runs is not None and done >= args.max_runs:
            break
        real = [train_items[i] for i in real_subset(num_train, n, seed)] if cond != SYNTH else []
        res = run_one(net, cond, seed, real, synthetic, test_images, test_labels, num_classes=num_classes,
                      steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                      amp=None if args.amp == "none" else args.amp, min_real_per_batch=args.min_real_per_batch,
                      progress=progress, vnet_dropout=args.vnet_dropout)
        results["runs"][key] = res
        session["seconds"] = time.perf_counter() - t_start
        save_results(out, results)
        done += 1
        print(f"{key}: mean Dice {res['mean']:.4f} ({', '.join(f'{d:.3f}' for d in res['per_class'])}) "
              f"in {res['seconds']:.0f} s", flush=True)
    session["seconds"] = time.perf_counter() - t_start
    session["new_runs"] = done
    save_results(out, results)
    downstream_report.write_report(results, out.with_suffix(".md"), out.with_suffix(".png"))
    print(f"{done} new runs, {len(results['runs'])} in {out}; {session['seconds']:.0f} s", flush=True)
    return results


if __name__ == "__main__":
    main()

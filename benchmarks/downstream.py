"""Downstream segmentation with synthetic pairs: the FOSCU Table II experiment on MSD Hippocampus (and CHAOS liver).

Trains MONAI segmentation networks in data-scarce regimes (``n`` real training cases) under several
conditions and measures Dice on the held-out test cases of the fixed split. Networks (:func:`build_network`):
``resunet`` (the paper's ResUNet: MONAI ``UNet`` with two residual units per level; ``unet`` is the same network
under the name earlier results files use), ``dynunet``, ``segresnet`` and ``vnet``. Conditions
(:func:`parse_condition`, ``--conditions``):

* ``real``: the ``n`` real cases only;
* ``mix<f>``: real + synthetic pairs mixed by :class:`duodiff.MixedBatchSampler`, a share ``f`` of every
  batch synthetic;
* ``qcmix<f>``: as ``mix<f>``, from the pool filtered by pair consistency. The simplest honest way: the pool is
  filtered with :func:`duodiff.control.qc_accepts`, the acceptance test ``DuoDiffusion.sample(qc=...)`` and
  ``duodiff sample --qc`` apply, judged by the tri-planar segmenter ``duodiff evaluate`` trains, trained here on
  the run's own ``n`` real cases (so the filter knows no more real data than the segmenter it feeds); failing
  pairs are dropped instead of regenerated (rejection sampling on the existing pool, no new generation). The
  judge's Dice on the val cases is recorded, to show how far its verdicts can be trusted (:func:`qc_filter`);
* ``pretrain``: synthetic pairs only, then fine-tuned on the ``n`` real cases (:func:`run_one`);
* ``synth``: synthetic pairs only (does not depend on ``n``; run once per network and seed).

Without ``--conditions``, the older flags choose them: ``real`` (unless ``--no-real-only``), ``mix<f>`` for
each ``--fractions`` (default 0.5) and ``synth`` (unless ``--no-synthetic-only``).

Two training protocols:

* fixed steps (default, as results files before issue 13): every run ``--steps`` optimiser steps of
  ``--batch-size``, cosine decay over them; ``pretrain`` spends ``--pretrain-share`` of them on synthetic pairs;
* converged (``--early-stopping``): up to ``--max-steps`` (cosine decay over the cap), the val mean Dice on the
  split's ``"val"`` cases every ``--val-every`` steps, stop after ``--patience`` evaluations without
  improvement, the best weights (a ``state_dict`` copy in memory) restored before the test evaluation;
  ``pretrain`` runs both phases that way. Needs ``val`` cases in the split (the hippocampus split has 20; the
  liver split has none, so liver runs stay on fixed steps unless a val list is added).

Real-sample exposure: every run records ``steps_trained``, ``real_seen`` and ``synthetic_seen`` (volumes drawn
into batches), with early stopping also ``best_step`` and the ``val_curve`` ``[[step, dice], ...]``. Under
fixed steps a ``mix<f>`` arm sees a share ``f`` fewer real samples than ``real``; under early stopping each arm
trains as long as its val Dice improves, and the report's exposure table shows what each arm actually saw.

Real volumes are preprocessed exactly as for training the generator
(:func:`duodiff.train.data.preprocess_case`: RAS, the model's recorded percentile clip (0.5/99.5 for models saved
before it was recorded) to [0, 1], crop/pad to the model's ``volume_shape`` around the label centroid). Test
cases are only ever used for evaluation; val cases only for early stopping and the QC judge's own score.

Seeds: seed ``s`` picks the real subset (the first ``n`` of a ``numpy.random.default_rng(s)`` permutation of the
train cases, so the 10-case subset is inside the 40-case one; with ``--subset model`` a permutation of the
cases in the model's ``training_cases.json``: the same-data protocol, where generator and segmenter see the
same real cases), the network initialisation (inside ``torch.random.fork_rng``, so the global RNG is
untouched) and the batch order. All runs of one seed share subset and initialisation: improvements are paired.

A pool of synthetic pairs is generated once (NIfTI in nnU-Net naming, ``<pool>/imagesTr``,
``<pool>/labelsTr``, read back with :meth:`duodiff.SyntheticPairDataset.from_folder`) and reused by all
runs; generation resumes where it stopped. Results go to a JSON file after every run; running the same
command again skips finished runs (an interrupted run resumes), then writes the Markdown table and plot.
A file holds runs of one set of :data:`RESULT_SETTINGS`; files written before a setting existed resume with
its old value (:data:`LEGACY_SETTINGS`: the fixed-steps protocol).

    python benchmarks/downstream.py --model src/duodiff/weights/hippocampus \
        --data ../shared/data/msd_hippocampus --split examples/hippocampus/split.json \
        --networks unet --regimes 10 --seeds 0 1 2 --fractions 0.5 --steps 400 \
        --out benchmarks/results/downstream_hippocampus.json

``--quick`` is a 1-minute sanity run (UNet, 10 cases, 1 seed, 20 steps, 8 synthetic pairs).

Issue 13 grid (same-data generators, converged segmenters), one command per K, each with its own
generator, pool and results file (``MODEL_K40``: the K = 40 generator's folder; K = 160 is the bundled model,
which has no ``training_cases.json``: use ``--regimes all --subset seed`` there, i.e. its 160 training cases):

    python benchmarks/downstream.py --model benchmarks/models/hippocampus_k10 --subset model --regimes 10 \
        --networks resunet dynunet segresnet --seeds 0 1 2 \
        --conditions real mix0.25 mix0.5 pretrain qcmix0.25 \
        --early-stopping --max-steps 4000 --val-every 100 --patience 10 --threads 1 \
        --synthetic-dir runs/downstream/synthetic_k10 --out benchmarks/results/downstream_hippocampus_k10.json
    # the same with --model MODEL_K40 --regimes 40, runs/downstream/synthetic_k40, ..._k40.json

CPU estimate (measured on this 2-core Xeon, 1 thread, while a training job held both cores, process CPU time;
the fixed-step results files measured about half of it unloaded: UNet 0.14 s, DynUNet 0.65 s per step):
a training step of batch 4 at 32 x 48 x 32 costs ResUNet 0.28 s, DynUNet 1.18 s, SegResNet 1.39 s; a val
evaluation (20 cases) 0.6 / 2.2 / 2.2 s (~2 % at --val-every 100); the QC judge 0.39 s per step (300 steps,
once per seed) plus 0.25 s per pool pair. One K is 3 seeds x 6 training phases (``pretrain`` has two) per
network; at ~2000 steps per phase (early stopping between ~1100 steps, best at the first evaluation, and the
4000 cap) that is ResUNet ~2.8 h, DynUNet ~12 h, SegResNet ~14 h of one core, ~29 h per K (about half
unloaded), plus ~10 min for the QC judges and a few minutes to generate the 200-pair pool. Run ResUNet first
(``--networks resunet``, same ``--out``); split seeds over processes with one ``--out`` each and merge them
with ``downstream_report.py A.json B.json --out merged.json``; on a GPU use ``--device cuda``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
# "unet" is the name results files before "resunet" existed use for the same network (see build_network)
NETWORKS = ("resunet", "unet", "dynunet", "segresnet", "vnet")
REAL, SYNTH, MIX, PRETRAIN, QCMIX = "real", "synth", "mix", "pretrain", "qcmix"
FORMAT = "duodiff-downstream-v1"

# Settings that change the numbers of a run; a results file only holds runs made with one set of them.
RESULT_SETTINGS = ("steps", "batch_size", "lr", "weight_decay", "amp", "num_synthetic", "synthetic_seed",
                   "gen_steps", "gen_dtype", "model", "data", "split", "volume_shape", "min_real_per_batch",
                   "vnet_dropout", "early_stopping", "max_steps", "val_every", "patience", "subset",
                   "pretrain_share", "qc_threshold", "qc_steps")
# What a results file written before a setting existed was run with (compared as if it had been recorded).
LEGACY_SETTINGS = {"vnet_dropout": None, "early_stopping": False, "max_steps": None, "val_every": None,
                   "patience": None, "subset": "seed"}
# Settings only the pretrain / qcmix conditions read: files written before they existed hold no such runs, so
# any value is compatible with them (and is recorded from then on).
NEW_CONDITION_SETTINGS = ("pretrain_share", "qc_threshold", "qc_steps")


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
        dict with ``train_images``/``val_images``/``test_images`` float32 ``(N, 1, H, W, D)`` in [0, 1],
        ``train_labels``/``val_labels``/``test_labels`` uint8 ``(N, 1, H, W, D)`` in ``0..K-1`` and the case
        names (``train_names``, ...). The ``val_*`` entries (the split's ``"val"`` cases, used for early
        stopping) are present only when the split has such cases.
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
    subsets = ("train", "val", "test") if split.get("val") else ("train", "test")
    if "val" in subsets:
        spec["val"] = True  # caches written before val cases were loaded lack them: a new key
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"real-{key}.npz" if cache_dir is not None else None
    if cache is not None and cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            return {k: (z[k].tolist() if k.endswith("names") else torch.from_numpy(z[k])) for k in z.files}
    out: dict[str, Any] = {}
    for subset in subsets:
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


def real_subset(num_train: int, n: int, seed: int, among: Sequence[int] | None = None) -> list[int]:
    """Indices of the ``n`` real training cases of seed ``seed`` (nested: the 10 of a seed are in its 40).

    ``among``: draw from these train indices only (``--subset model``: the generator's own training cases);
    default: all ``num_train``.
    """
    pool = list(range(num_train)) if among is None else [int(i) for i in among]
    if not 1 <= n <= len(pool):
        what = "training cases" if among is None else "training cases of the model"
        raise ValueError(f"A regime of {n} real cases is not possible with {len(pool)} {what}; "
                         f"use 1..{len(pool)}.")
    return [pool[i] for i in np.random.default_rng(seed).permutation(len(pool))[:n].tolist()]


def model_training_cases(model: str | os.PathLike, train_names: Sequence[str]) -> list[int]:
    """Indices into ``train_names`` of the cases a model was trained on (its ``training_cases.json``).

    Raises:
        FileNotFoundError: the model has no ``training_cases.json`` (saved before duodiff wrote it).
        ValueError: it names cases outside the split's train list (the segmenter could then see test cases).
    """
    from duodiff.hub import TRAINING_CASES

    path = Path(model) / TRAINING_CASES
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist: --subset model needs a model written by "
                                "`duodiff train` (which records its training cases); use --subset seed.")
    names = [str(n) for n in json.loads(path.read_text())["train"]]
    index = {str(n): i for i, n in enumerate(train_names)}
    outside = [n for n in names if n not in index]
    if outside:
        raise ValueError(f"The model was trained on cases that are not train cases of this split: {outside[:5]} "
                         f"({len(outside)} in all). Use the split the model was trained with.")
    return [index[n] for n in names]


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


def qc_filter(synthetic: list[dict], real: list[dict], *, num_classes: int, threshold: float, segmenter_steps: int,
              seed: int, val_images: torch.Tensor | None = None, val_labels: torch.Tensor | None = None,
              segmenter: nn.Module | None = None, device: str = "cpu",
              progress: bool = True) -> tuple[list[dict], dict[str, Any]]:
    """The synthetic pairs whose image shows its label, judged as ``duodiff sample --qc`` judges them.

    The judge is the tri-planar :class:`duodiff.segmenter.SliceSegmenter` that ``duodiff evaluate`` trains
    (:func:`duodiff.segmenter.train_segmenter`, ``segmenter_steps`` steps), trained here on the run's ``real``
    cases only, so the filter knows no more real data than the downstream segmenter it feeds. A pair passes
    if :func:`duodiff.control.qc_accepts` (the test ``DuoDiffusion.sample(qc=...)`` applies) gives a mean
    foreground Dice ``>= threshold``. Failing pairs are dropped, not regenerated: filtering the fixed pool is
    rejection sampling with the same acceptance test, without new generation.

    ``segmenter``: a judge to use instead of training one (e.g. ``SliceSegmenter.load`` of the folder
    ``duodiff evaluate`` wrote; it must not have seen more real cases than ``real``).

    Returns:
        the accepted pairs and ``{"qc_pool": kept, "qc_pool_total", "qc_dice_mean", "qc_segmenter_val_dice"}``
        (the judge's own Dice on the val cases, ``None`` without them: how far its verdicts can be trusted).

    Raises:
        ValueError: no pair passes (lower ``--qc-threshold``).
    """
    from duodiff.control import pair_dice, qc_accepts
    from duodiff.segmenter import train_segmenter

    if segmenter is None:
        images = torch.stack([r["image"] for r in real]).float()
        labels = torch.stack([r["label"] for r in real]).long()
        with torch.random.fork_rng(devices=[]):
            segmenter = train_segmenter(images, labels, num_classes=num_classes, num_steps=segmenter_steps,
                                        seed=seed, device=device, progress=progress)
    seg = segmenter.to(device).eval()
    accepted: list[bool] = []
    dice: list[float] = []
    for i in range(0, len(synthetic), 16):
        chunk = synthetic[i:i + 16]
        ok, d = qc_accepts(seg, torch.stack([c["image"] for c in chunk]).float(),
                           torch.stack([c["label"] for c in chunk]).long(), num_classes, threshold)
        accepted += ok.tolist()
        dice += d.tolist()
    kept = [item for item, ok in zip(synthetic, accepted) if ok]
    if not kept:
        raise ValueError(f"No synthetic pair passes the pair-consistency QC at Dice >= {threshold} (best "
                         f"{max(dice, default=float('nan')):.3f}); lower --qc-threshold.")
    val_dice = None
    if val_images is not None and len(val_images):
        val_dice = float(pair_dice(seg, val_images.float(), val_labels.long(), num_classes).mean())
    return kept, {"qc_pool": len(kept), "qc_pool_total": len(synthetic), "qc_dice_mean": float(np.mean(dice)),
                  "qc_segmenter_val_dice": val_dice}


# ============================================================================================ conditions
@dataclass(frozen=True)
class Condition:
    """A training condition, parsed from its name by :func:`parse_condition`.

    Attributes:
        name: canonical name, the one in run keys (``"mix0.25"``, not ``"mix0.250"``).
        kind: ``"real"``, ``"synth"``, ``"mix"``, ``"qcmix"`` or ``"pretrain"``.
        fraction: synthetic share of every batch (0 real, 1 synth); ``None`` for ``pretrain`` (all-synthetic
            batches first, then all-real).
    """

    name: str
    kind: str
    fraction: float | None

    @property
    def uses_real(self) -> bool:
        return self.kind != SYNTH

    @property
    def uses_synthetic(self) -> bool:
        return self.kind != REAL


def parse_condition(condition: str) -> Condition:
    """Parse a condition name.

    * ``real``: the real cases only; ``synth``: the synthetic pool only (no real case);
    * ``mix<f>``: a share ``f`` (0 < f < 1) of every batch synthetic (:class:`duodiff.MixedBatchSampler`);
    * ``qcmix<f>``: as ``mix<f>``, from the pool filtered by pair consistency (:func:`qc_filter`);
    * ``pretrain``: synthetic only, then fine-tuned on the real cases (see :func:`run_one`).

    >>> parse_condition("mix0.50")
    Condition(name='mix0.5', kind='mix', fraction=0.5)
    """
    if condition in (REAL, SYNTH):
        return Condition(condition, condition, 0.0 if condition == REAL else 1.0)
    if condition == PRETRAIN:
        return Condition(PRETRAIN, PRETRAIN, None)
    for kind in (QCMIX, MIX):
        if condition.startswith(kind):
            try:
                f = float(condition[len(kind):])
            except ValueError:
                break
            if 0.0 < f < 1.0:
                return Condition(f"{kind}{f:g}", kind, f)
            break
    raise ValueError(f"Unknown condition {condition!r}: use 'real', 'synth', 'pretrain', 'mix<f>' or 'qcmix<f>' "
                     "with 0 < f < 1 (e.g. mix0.25).")


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
    """Endless training batches for a condition (``"real"``, ``"synth"``, ``"mix<f>"`` or ``"qcmix<f>"``; the
    caller passes the filtered pool as ``synthetic`` for ``qcmix``).

    Mixed batches come from :class:`duodiff.MixedBatchSampler` over ``ConcatDataset([real, synthetic])``:
    ``round_half_up(f * batch_size)`` synthetic samples per batch, epochs over the real cases.
    """
    from torch.utils.data import ConcatDataset, DataLoader, default_collate

    from duodiff import MixedBatchSampler

    cond = parse_condition(condition)
    if cond.kind == PRETRAIN:
        raise ValueError("'pretrain' has two phases; train them with batches('synth', ...) and batches('real', ...).")
    g = torch.Generator().manual_seed(seed)
    if cond.kind in (REAL, SYNTH):
        data = real if cond.kind == REAL else synthetic
        if not data:
            raise ValueError(f"Condition {condition!r} has no samples.")
        for idx in _cycled(len(data), batch_size, g):
            yield default_collate([data[i] for i in idx])
    fraction = cond.fraction
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


# ============================================================================================ networks
def build_network(name: str, *, in_channels: int, out_channels: int, volume_shape: Sequence[int],
                  vnet_dropout: float | None = None) -> nn.Module:
    """A MONAI segmentation network; checks that ``volume_shape`` suits it.

    * ``resunet``: ``UNet`` with residual units (``num_res_units=2``), channels 16-128, instance norm: the
      paper's ResUNet. ``unet`` is the same network under the name earlier results files use.
    * ``dynunet``: ``DynUNet`` with residual blocks, filters 16-128, instance norm.
    * ``segresnet``: ``SegResNet`` with ``init_filters=16`` (16-128 channels, MONAI's blocks and group norm).
    * ``vnet``: ``VNet`` as MONAI ships it; ``vnet_dropout`` sets every dropout layer (``None``: 0.5 each).
    """
    from monai.networks import nets

    need = {"resunet": 8, "unet": 8, "dynunet": 8, "segresnet": 8, "vnet": 16}
    if name not in need:
        raise ValueError(f"Unknown network {name!r}; choose from {list(NETWORKS)}.")
    bad = [s for s in volume_shape if s % need[name]]
    if bad:
        raise ValueError(f"{name} needs volume sides divisible by {need[name]}, got {tuple(volume_shape)} "
                         "(e.g. 32 x 48 x 32).")
    if name in ("unet", "resunet"):
        return nets.UNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels,
                         channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2, norm="instance")
    if name == "dynunet":
        return nets.DynUNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels,
                            kernel_size=[3, 3, 3, 3], strides=[1, 2, 2, 2], upsample_kernel_size=[2, 2, 2],
                            filters=[16, 32, 64, 128], norm_name="instance", res_block=True)
    if name == "segresnet":
        return nets.SegResNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, init_filters=16,
                              blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1))
    net = nets.VNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels)
    if vnet_dropout is not None:  # VNet's constructor cannot reach the skip dropout of its two top up-blocks
        for m in net.modules():
            if isinstance(m, nn.modules.dropout._DropoutNd):
                m.p = float(vnet_dropout)
    return net


# ============================================================================================ train / eval
def _autocast(amp: str | None, device: str | torch.device = "cpu") -> contextlib.AbstractContextManager:
    if amp in (None, "none", "float32"):
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=getattr(torch, amp))


def _device_of(net: nn.Module) -> torch.device:
    param = next(net.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@dataclass(frozen=True)
class EarlyStopping:
    """The converged-segmenter protocol: train up to ``max_steps``, evaluate the val mean Dice every
    ``val_every`` steps (and at the last step), stop after ``patience`` evaluations without improvement and
    restore the best weights."""

    max_steps: int
    val_every: int
    patience: int

    def __post_init__(self) -> None:
        for k in ("max_steps", "val_every", "patience"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"EarlyStopping.{k} must be an int >= 1, got {v!r}.")


def train(net: nn.Module, data: Iterator[dict[str, torch.Tensor]], *, steps: int, lr: float,
          weight_decay: float = 1e-5, amp: str | None = None, progress: bool = True, desc: str = "train",
          validate: Callable[[nn.Module], float] | None = None, val_every: int = 1,
          patience: int = 1) -> dict[str, Any]:
    """AdamW + cosine decay (over ``steps``) on DiceCE loss.

    Without ``validate``: exactly ``steps`` batches (the fixed-steps protocol). With ``validate`` (early
    stopping): ``steps`` is the cap; every ``val_every`` steps and at the last step ``validate(net)`` gives a
    score (val mean Dice, higher is better); training stops after ``patience`` evaluations without a strictly
    better score, and the weights of the best evaluation (a ``state_dict`` copy in memory) are loaded back
    into ``net`` before returning. A non-finite score never counts as an improvement; if no score is finite
    the final weights stay (``best_step`` ``None``).

    Returns:
        ``final_loss`` (mean of the last 10 % of steps), ``synthetic_share_seen``, ``steps_trained``,
        ``real_seen`` and ``synthetic_seen`` (samples); with ``validate`` also ``best_step``, ``best_val``,
        ``val_curve`` (``[[step, score], ...]``) and ``stopped_early``.
    """
    from monai.losses import DiceCELoss
    from tqdm.auto import tqdm

    device = _device_of(net)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    net.train()
    losses, seen, synthetic = [], 0, 0
    best, best_step, best_state, bad, curve, stopped = -math.inf, None, None, 0, [], False
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for i in bar:
        batch = next(data)
        image, label = batch["image"].to(device), batch["label"].long().to(device)
        flags = torch.as_tensor(batch["is_synthetic"])
        seen, synthetic = seen + len(flags), synthetic + int(flags.sum())
        with _autocast(amp, device):
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
        step = i + 1
        if validate is not None and (step % val_every == 0 or step == steps):
            score = float(validate(net))
            net.train()
            curve.append([step, score])
            if math.isfinite(score) and score > best:
                best, best_step, bad = score, step, 0
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            else:
                bad += 1
                if bad >= patience:
                    stopped = step < steps
                    break
    tail = losses[-max(1, len(losses) // 10):]
    out: dict[str, Any] = {"final_loss": float(np.mean(tail)), "synthetic_share_seen": synthetic / max(seen, 1),
                           "steps_trained": len(losses), "real_seen": seen - synthetic, "synthetic_seen": synthetic}
    if validate is not None:
        if best_state is not None:
            net.load_state_dict(best_state)
        out.update(best_step=best_step, best_val=best if best_state is not None else None, val_curve=curve,
                   stopped_early=stopped)
    return out


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
    device = _device_of(net)
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    for i in range(0, len(images), batch_size):
        with _autocast(amp, device):
            logits = net(images[i:i + batch_size].float().to(device))
        pred = logits.float().argmax(1, keepdim=True).cpu()
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
            min_real_per_batch: int = 0, progress: bool = True, vnet_dropout: float | None = None,
            early_stopping: EarlyStopping | None = None, val_images: torch.Tensor | None = None,
            val_labels: torch.Tensor | None = None, validate: Callable[[nn.Module], float] | None = None,
            pretrain_share: float = 0.5, device: str = "cpu") -> dict[str, Any]:
    """Train one network under one condition and evaluate it on the test arrays.

    The network is initialised (and dropout drawn) from ``seed`` inside ``torch.random.fork_rng``, so the
    caller's global RNG state is unchanged and the run does not depend on what ran before it.

    Protocols: without ``early_stopping``, ``steps`` optimiser steps. With it, up to ``max_steps`` with early
    stopping on the val mean Dice (``val_images`` / ``val_labels``, or the ``validate(net) -> score`` given, e.g.
    by a test) and the best weights restored before the test evaluation.

    ``pretrain``: a first phase on the synthetic pool only, then a second on the real cases only, each with a
    fresh optimiser and cosine schedule; fixed steps: ``round_half_up(pretrain_share * steps)`` synthetic
    steps, the rest real; early stopping: each phase up to ``max_steps`` with early stopping, the best
    synthetic-phase weights being where fine-tuning starts. Steps in ``best_step`` and ``val_curve`` count
    from the start of the run (the fine-tuning phase starts after ``pretrain_steps``).

    Returns:
        the run record: Dice (``mean``, ``per_class``, ``per_case``), ``steps_trained``, ``real_seen``,
        ``synthetic_seen``, with early stopping ``best_step``, ``best_val``, ``val_curve``, ...
    """
    from duodiff.data.mixing import round_half_up

    t0 = time.perf_counter()
    cond = parse_condition(condition)
    es = early_stopping
    if es is not None and validate is None:
        if val_images is None or not len(val_images):
            raise ValueError("Early stopping needs validation cases: the split has no 'val' cases. Add some to the "
                             "split (never test cases), or use the fixed-steps protocol (--steps).")
        validate = lambda m: evaluate(m, val_images, val_labels, num_classes, amp=amp)["mean"]  # noqa: E731
    shape = tuple(test_images.shape[2:])
    desc = f"{network} {cond.name} s{seed}"

    def phase(data: Iterator[dict[str, torch.Tensor]], budget: int, tag: str) -> dict[str, Any]:
        if es is None:
            return train(net, data, steps=budget, lr=lr, weight_decay=weight_decay, amp=amp, progress=progress,
                         desc=tag)
        return train(net, data, steps=es.max_steps, lr=lr, weight_decay=weight_decay, amp=amp, progress=progress,
                     desc=tag, validate=validate, val_every=es.val_every, patience=es.patience)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_network(network, in_channels=int(test_images.shape[1]), out_channels=num_classes,
                            volume_shape=shape, vnet_dropout=vnet_dropout).to(device)

        def data(kind: str) -> Iterator[dict[str, torch.Tensor]]:
            return batches(kind, real, synthetic, batch_size=batch_size, seed=seed,
                           min_real_per_batch=min_real_per_batch)

        if cond.kind != PRETRAIN:
            stats = phase(data(cond.name), steps, desc)
        else:
            if not 0.0 < pretrain_share < 1.0:
                raise ValueError(f"pretrain_share must be in (0, 1), got {pretrain_share}.")
            first = round_half_up(pretrain_share * steps)
            if es is None and not 1 <= first < steps:
                raise ValueError(f"{steps} steps at pretrain_share {pretrain_share} leave no step for one of the "
                                 "two phases; use more --steps.")
            pre = phase(data(SYNTH), first, desc + " (synthetic)")
            fine = phase(data(REAL), steps - first, desc + " (real)")
            n_pre = pre["steps_trained"]
            stats = {**fine, "steps_trained": n_pre + fine["steps_trained"], "pretrain_steps": n_pre,
                     "real_seen": fine["real_seen"], "synthetic_seen": pre["synthetic_seen"],
                     "synthetic_share_seen": pre["synthetic_seen"] / max(1, pre["synthetic_seen"] + fine["real_seen"])}
            if es is not None:
                stats["pretrain_best_step"], stats["pretrain_best_val"] = pre["best_step"], pre["best_val"]
                stats["val_curve"] = pre["val_curve"] + [[s + n_pre, v] for s, v in fine["val_curve"]]
                stats["best_step"] = None if fine["best_step"] is None else fine["best_step"] + n_pre
    dice = evaluate(net, test_images, test_labels, num_classes, amp=amp)
    return {"network": network, "num_real": len(real) if cond.uses_real else 0, "condition": cond.name,
            "fraction": cond.fraction, "seed": seed, **dice, **stats,
            "num_parameters": sum(p.numel() for p in net.parameters()),
            "seconds": time.perf_counter() - t0}


# ============================================================================================ results file
def settings_diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The :data:`RESULT_SETTINGS` in which two settings dicts differ, as ``{key: (old, new)}``.

    A key missing from ``old`` (a file written before the setting existed) counts as its
    :data:`LEGACY_SETTINGS` value; one of :data:`NEW_CONDITION_SETTINGS` missing from either side matches
    anything.
    """
    diff = {}
    for k in RESULT_SETTINGS:
        if k in NEW_CONDITION_SETTINGS and (k not in old or k not in new):
            continue
        a, b = old.get(k, LEGACY_SETTINGS.get(k)), new.get(k, LEGACY_SETTINGS.get(k))
        if a != b:
            diff[k] = (a, b)
    return diff


def load_results(path: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The results file (new if absent); refuses one written with other settings.

    A file from before a setting existed resumes when the setting has its old value
    (:func:`settings_diff`); the settings it lacked are then recorded in it.
    """
    if path.is_file():
        results = json.loads(path.read_text())
        if results.get("format") != FORMAT:
            raise ValueError(f"{str(path)!r} is not a downstream results file (format {results.get('format')!r}).")
        diff = settings_diff(results["settings"], settings)
        if diff:
            raise ValueError(f"{str(path)!r} holds runs made with other settings {diff} (old, new). Pass another "
                             "--out, or the same settings to resume.")
        for k, v in settings.items():
            results["settings"].setdefault(k, v)
        return results
    return {"format": FORMAT, "settings": settings, "runs": {}, "sessions": []}


def save_results(path: Path, results: dict[str, Any]) -> None:
    """Write atomically (a killed process leaves the previous file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True))
    tmp.replace(path)


def default_conditions(fractions: Sequence[float], *, synthetic_only: bool = True,
                       real_only: bool = True) -> list[str]:
    """The conditions of the older flags: ``real``, ``mix<f>`` per fraction, ``synth``."""
    return ([REAL] if real_only else []) + [f"mix{f:g}" for f in fractions] + ([SYNTH] if synthetic_only else [])


def plan(networks: Sequence[str], regimes: Sequence[int], seeds: Sequence[int],
         conditions: Sequence[str]) -> list[tuple[str, int, str, int]]:
    """Runs in priority order: per network, per regime, per seed: the conditions in the order given (``real``
    first when listed); then the synthetic-only runs (no real case, so once per network and seed)."""
    conds = [parse_condition(c).name for c in conditions]
    runs = []
    for net in networks:
        for n in regimes:
            for s in seeds:
                runs += [(net, n, c, s) for c in conds if c != SYNTH]
        if SYNTH in conds:
            runs += [(net, 0, SYNTH, s) for s in seeds]
    return runs


# ============================================================================================ CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="Duo-Diffusion model folder (default: the bundled model)")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "msd_hippocampus"))
    ap.add_argument("--split", default=str(ROOT / "examples" / "hippocampus" / "split.json"))
    ap.add_argument("--networks", nargs="+", default=["unet"], choices=NETWORKS,
                    help="resunet: the paper's ResUNet (unet: the same network, the name of earlier results files)")
    ap.add_argument("--regimes", nargs="+", default=["10"],
                    help="real training cases per regime: numbers and/or 'all' (every train case of the split, or "
                         "of the model with --subset model)")
    ap.add_argument("--subset", default="seed", choices=["seed", "model"],
                    help="which real cases a regime gets: seed (a seeded draw from the split's train cases) or model "
                         "(drawn from the cases the generator was trained on, its training_cases.json: the "
                         "same-data protocol)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--conditions", nargs="+", default=None,
                    help="conditions to run: real, synth, pretrain, mix<f>, qcmix<f> (0 < f < 1); default: real, "
                         "mix<f> for each --fractions, synth")
    ap.add_argument("--fractions", nargs="*", type=float, default=None,
                    help="synthetic share of each mixed batch (0 < f < 1; default 0.5); none: no mixed runs")
    ap.add_argument("--no-synthetic-only", action="store_true", help="skip the synthetic-only runs")
    ap.add_argument("--no-real-only", action="store_true", help="skip the real-only runs")
    ap.add_argument("--steps", type=int, default=400, help="optimiser steps per run (fixed-steps protocol)")
    ap.add_argument("--early-stopping", action="store_true",
                    help="converged segmenters: up to --max-steps, early stopping on the split's val cases")
    ap.add_argument("--max-steps", type=int, default=4000, help="step cap with --early-stopping")
    ap.add_argument("--val-every", type=int, default=100, help="steps between val evaluations (--early-stopping)")
    ap.add_argument("--patience", type=int, default=10,
                    help="val evaluations without improvement of the mean Dice before stopping (--early-stopping)")
    ap.add_argument("--pretrain-share", type=float, default=0.5,
                    help="share of --steps spent on synthetic pairs by 'pretrain' (fixed-steps protocol)")
    ap.add_argument("--qc-threshold", type=float, default=0.5, help="pair-consistency Dice a 'qcmix' pair needs")
    ap.add_argument("--qc-steps", type=int, default=300, help="training steps of the 'qcmix' judge segmenter")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=1e-5)
    ap.add_argument("--min-real-per-batch", type=int, default=0)
    ap.add_argument("--amp", default="none", choices=["none", "bfloat16"],
                    help="autocast dtype of the segmentation nets (bfloat16: ~1.7x faster DynUNet/VNet on CPU, but "
                         "not bit-reproducible and NaN-prone with instance norm on tiny bottlenecks)")
    ap.add_argument("--device", default="cpu",
                    help="torch device of the segmentation nets and the QC judge (e.g. cuda:0; not tried on a GPU "
                         "yet, and GPU runs are not bit-reproducible)")
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
    if args.conditions is not None:
        if args.fractions is not None or args.no_synthetic_only or args.no_real_only:
            ap.error("--conditions lists every condition; drop --fractions / --no-synthetic-only / --no-real-only.")
        try:
            args.conditions = list(dict.fromkeys(parse_condition(c).name for c in args.conditions))
        except ValueError as e:
            ap.error(str(e))
    else:
        fractions = [0.5] if args.fractions is None else args.fractions
        for f in fractions:
            if not 0.0 < f < 1.0:
                ap.error(f"--fractions must be in (0, 1), got {f}; use --no-real-only / synthetic-only runs for 0 "
                         "or 1.")
        args.conditions = default_conditions(fractions, synthetic_only=not args.no_synthetic_only,
                                             real_only=not args.no_real_only)
    if args.quick:
        args.networks, args.regimes, args.seeds = ["unet"], ["10"], [0]
        args.steps, args.num_synthetic, args.gen_steps = 20, 8, 10
        if args.out == ap.get_default("out"):
            args.out = str(ROOT / "runs" / "downstream" / "quick.json")
    if args.steps < 1 or args.batch_size < 1 or args.num_synthetic < 1:
        ap.error("--steps, --batch-size and --num-synthetic must be >= 1.")
    if min(args.max_steps, args.val_every, args.patience, args.qc_steps) < 1:
        ap.error("--max-steps, --val-every, --patience and --qc-steps must be >= 1.")
    if not 0.0 < args.pretrain_share < 1.0:
        ap.error(f"--pretrain-share must be in (0, 1), got {args.pretrain_share}.")
    if not 0.0 <= args.qc_threshold <= 1.0:
        ap.error(f"--qc-threshold is a Dice in [0, 1], got {args.qc_threshold}.")
    return args


def protocol_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings of the training protocol and the ways of using synthetic pairs; those of the protocol not in
    use are ``None`` (the fixed-steps values are what :data:`LEGACY_SETTINGS` assumes of older files)."""
    es = args.early_stopping
    return {"steps": None if es else args.steps, "early_stopping": es,
            "max_steps": args.max_steps if es else None, "val_every": args.val_every if es else None,
            "patience": args.patience if es else None, "subset": args.subset,
            "pretrain_share": None if es else args.pretrain_share, "qc_threshold": args.qc_threshold,
            "qc_steps": args.qc_steps}


def run_settings(args: argparse.Namespace, *, model: Path, config: Any, real_data: dict[str, Any]) -> dict[str, Any]:
    """The settings recorded in (and checked against) the results file."""
    return {
        "batch_size": args.batch_size, "lr": args.lr,
        "weight_decay": args.weight_decay, "amp": args.amp, "num_synthetic": args.num_synthetic,
        "synthetic_seed": args.synthetic_seed, "gen_steps": args.gen_steps,
        "gen_dtype": None if args.gen_dtype == "none" else args.gen_dtype,
        "model": model_id(str(model)), "model_path": str(model), "data": Path(args.data).name,
        "split": _file_digest(Path(args.split)), "volume_shape": list(config.volume_shape),
        "min_real_per_batch": args.min_real_per_batch, "num_classes": config.num_classes,
        "label_names": list(config.label_names), "num_train_cases": len(real_data["train_names"]),
        "num_val_cases": len(real_data.get("val_names", [])), "num_test_cases": len(real_data["test_names"]),
        "vnet_dropout": args.vnet_dropout, **protocol_settings(args),
    }


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
    if args.early_stopping and not real_data.get("val_names"):
        raise ValueError(f"--early-stopping needs validation cases, and split {args.split!r} has no 'val' cases. "
                         "Add some (never test cases) or use the fixed-steps protocol (--steps).")
    train_names = list(real_data["train_names"])
    among = model_training_cases(model, train_names) if args.subset == "model" else None
    num_train = len(train_names)
    regimes = sorted({(num_train if among is None else len(among)) if r == "all" else int(r) for r in args.regimes})
    settings = run_settings(args, model=model, config=config, real_data=real_data)
    out = Path(args.out)
    results = load_results(out, settings)
    session = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "argv": list(argv or sys.argv[1:]),
               "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "device": args.device,
               "machine": platform.processor() or platform.machine(), "torch": torch.__version__}
    results["sessions"].append(session)

    todo = plan(args.networks, regimes, args.seeds, args.conditions)
    pending = [r for r in todo if run_key(*r) not in results["runs"]]
    synthetic: list[dict] = []
    if any(parse_condition(c).uses_synthetic for _, _, c, _ in pending):
        folder, gen_seconds = synthetic_pool(model, args.synthetic_dir, args.num_synthetic, seed=args.synthetic_seed,
                                             num_inference_steps=args.gen_steps, dtype=settings["gen_dtype"],
                                             progress=progress)
        session["generation_seconds"] = gen_seconds
        synthetic = load_pool(folder, args.num_synthetic, args.synthetic_seed)
    test_images, test_labels = real_data["test_images"], real_data["test_labels"]
    val_images, val_labels = real_data.get("val_images"), real_data.get("val_labels")
    train_items = as_items(real_data["train_images"], real_data["train_labels"])
    es = EarlyStopping(args.max_steps, args.val_every, args.patience) if args.early_stopping else None
    qc_pools: dict[tuple, tuple[list[dict], dict[str, Any]]] = {}  # (real subset, seed) -> filtered pool, stats
    done = 0
    for net, n, cond, seed in todo:
        key = run_key(net, n, cond, seed)
        if key in results["runs"]:
            continue
        if args.max_runs is not None and done >= args.max_runs:
            break
        kind = parse_condition(cond).kind
        idx = real_subset(num_train, n, seed, among) if kind != SYNTH else []
        real = [train_items[i] for i in idx]
        pool, extra = synthetic, {}
        if kind == QCMIX:
            qkey = (tuple(sorted(idx)), seed)
            if qkey not in qc_pools:
                t = time.perf_counter()
                kept, info = qc_filter(synthetic, real, num_classes=num_classes, threshold=args.qc_threshold,
                                       segmenter_steps=args.qc_steps, seed=seed, val_images=val_images,
                                       val_labels=val_labels, device=args.device, progress=progress)
                qc_pools[qkey] = kept, {**info, "qc_seconds": time.perf_counter() - t}
            pool, extra = qc_pools[qkey]
        res = run_one(net, cond, seed, real, pool, test_images, test_labels, num_classes=num_classes,
                      steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                      amp=None if args.amp == "none" else args.amp, min_real_per_batch=args.min_real_per_batch,
                      progress=progress, vnet_dropout=args.vnet_dropout, early_stopping=es, val_images=val_images,
                      val_labels=val_labels, pretrain_share=args.pretrain_share, device=args.device)
        res.update(extra, real_cases=[train_names[i] for i in idx])
        results["runs"][key] = res
        session["seconds"] = time.perf_counter() - t_start
        save_results(out, results)
        done += 1
        steps_note = (f", {res['steps_trained']} steps (best {res['best_step']})" if es is not None else "")
        print(f"{key}: mean Dice {res['mean']:.4f} ({', '.join(f'{d:.3f}' for d in res['per_class'])}) "
              f"in {res['seconds']:.0f} s{steps_note}", flush=True)
    session["seconds"] = time.perf_counter() - t_start
    session["new_runs"] = done
    save_results(out, results)
    downstream_report.write_report(results, out.with_suffix(".md"), out.with_suffix(".png"))
    print(f"{done} new runs, {len(results['runs'])} in {out}; {session['seconds']:.0f} s", flush=True)
    return results


if __name__ == "__main__":
    main()

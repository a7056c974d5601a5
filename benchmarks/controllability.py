"""Controllability of a volume-conditioned label LDM.

For every foreground class: request volumes at the real 10th / 50th / 90th percentiles (of the training split)
and check that the achieved median is within +-15 % of each request; request a sweep of volumes between the
5th and 95th percentiles and report the Spearman correlation requested vs achieved (target >= 0.8). Only the
label stage runs (``pipe.sample_labels``), so this is cheap. Writes JSON + Markdown + a PNG.

    python benchmarks/controllability.py --model src/duodiff/weights/hippocampus \
        --data ../shared/data/msd_hippocampus --split examples/hippocampus/split.json --out docs/results/control
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties), numpy only."""

    def ranks(x: np.ndarray) -> np.ndarray:
        order = np.argsort(x, kind="mergesort")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):  # average ties
            idx = x == v
            r[idx] = r[idx].mean()
        return r

    ra, rb = ranks(np.asarray(a, float)), ranks(np.asarray(b, float))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--variant", default=None, choices=["fp16"], help="weights variant (the bundled model is fp16)")
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", required=True)
    ap.add_argument("--per-request", type=int, default=16, help="samples per percentile request")
    ap.add_argument("--sweep-levels", type=int, default=8)
    ap.add_argument("--per-level", type=int, default=4)
    ap.add_argument("--guidance-scales", type=float, nargs="+", default=[1.0, 3.0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()


    from duodiff import DuoDiffusion
    from duodiff.optional import require_matplotlib
    from duodiff.train.data import load_split_cases

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = DuoDiffusion.from_pretrained(args.model, variant=args.variant)
    c = pipe.config
    if "volume" not in c.attributes:
        raise SystemExit(f"{args.model} is not volume-conditioned (attributes={list(c.attributes)}).")
    voxel_ml = math.prod(c.spacing) / 1000.0
    _, train_labels, cases = load_split_cases(args.data, args.split, "train", c.volume_shape, c.num_classes,
                                              intensity_percentiles=c.intensity_percentiles)
    vols = {n: (train_labels[:, 0] == k).flatten(1).sum(1).tolist() for k, n in enumerate(c.label_names[1:], start=1)}
    results: dict = {"meta": {"model": args.model, "sampler": f"DDIM-{args.steps} {args.dtype}",
                              "train_cases": len(cases)}, "classes": {}}
    t0 = time.perf_counter()
    seed = 5000
    for g in args.guidance_scales:
        per_g = results["classes"].setdefault(f"guidance_{g:g}", {})
        for k, name in enumerate(c.label_names[1:], start=1):
            v = np.array(vols[name], float)
            entry: dict = {"percentiles": {}, "sweep": {}}
            for p in (10, 50, 90):
                req = float(np.percentile(v, p))
                labs = pipe.sample_labels(args.per_request, seed=seed, class_volumes={name: req * voxel_ml},
                                          guidance_scale=g, num_inference_steps=args.steps, dtype=args.dtype,
                                          progress=False)
                seed += args.per_request
                got = (labs[:, 0] == k).flatten(1).sum(1).float().numpy()
                med = float(np.median(got))
                entry["percentiles"][f"p{p}"] = {"requested_voxels": req, "achieved_median": med,
                                                 "relative_error": (med - req) / req,
                                                 "within_15pct": abs(med - req) <= 0.15 * req,
                                                 "achieved": got.tolist()}
            levels = np.linspace(np.percentile(v, 5), np.percentile(v, 95), args.sweep_levels)
            req_all, got_all = [], []
            for lv in levels:
                labs = pipe.sample_labels(args.per_level, seed=seed, class_volumes={name: float(lv) * voxel_ml},
                                          guidance_scale=g, num_inference_steps=args.steps, dtype=args.dtype,
                                          progress=False)
                seed += args.per_level
                got = (labs[:, 0] == k).flatten(1).sum(1).float().numpy()
                req_all += [float(lv)] * len(got)
                got_all += got.tolist()
            entry["sweep"] = {"requested": req_all, "achieved": got_all,
                              "spearman": spearman(np.array(req_all), np.array(got_all))}
            per_g[name] = entry
    results["meta"]["seconds"] = time.perf_counter() - t0
    (out / "controllability.json").write_text(json.dumps(results, indent=2))

    lines = [f"# Controllability of `{args.model}`", "",
             f"{results['meta']['sampler']}; requests at the 10th/50th/90th percentile of real training volumes "
             f"({args.per_request} samples each) and a sweep of {args.sweep_levels} levels x {args.per_level} samples "
             f"between the 5th and 95th percentiles; {results['meta']['seconds']:.0f} s.", "",
             "| guidance | class | request | requested (voxels) | achieved median | error | within ±15 % |",
             "|---|---|---|---|---|---|---|"]
    for gk, per_g in results["classes"].items():
        for name, e in per_g.items():
            for p, r in e["percentiles"].items():
                lines.append(f"| {gk.split('_')[1]} | {name} | {p} | {r['requested_voxels']:.0f} | "
                             f"{r['achieved_median']:.0f} | {100 * r['relative_error']:+.1f} % | "
                             f"{'yes' if r['within_15pct'] else 'no'} |")
    lines += ["", "| guidance | class | Spearman requested vs achieved (target >= 0.8) |", "|---|---|---|"]
    for gk, per_g in results["classes"].items():
        for name, e in per_g.items():
            lines.append(f"| {gk.split('_')[1]} | {name} | {e['sweep']['spearman']:.3f} |")
    (out / "controllability.md").write_text("\n".join(lines) + "\n")

    plt = require_matplotlib()
    gks = list(results["classes"])
    names = list(c.label_names[1:])
    fig, axes = plt.subplots(1, len(gks), figsize=(4.5 * len(gks), 4), squeeze=False)
    for ax, gk in zip(axes[0], gks):
        for name in names:
            e = results["classes"][gk][name]["sweep"]
            ax.scatter(e["requested"], e["achieved"], s=10, alpha=0.6,
                       label=f"{name} (rho={results['classes'][gk][name]['sweep']['spearman']:.2f})")
        lo = min(min(results["classes"][gk][n]["sweep"]["requested"]) for n in names)
        hi = max(max(results["classes"][gk][n]["sweep"]["requested"]) for n in names)
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set_xlabel("requested volume (voxels)")
        ax.set_ylabel("achieved volume (voxels)")
        ax.set_title(f"guidance scale {gk.split('_')[1]}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "controllability.png", dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main()

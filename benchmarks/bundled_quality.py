"""Quality of a trained Duo-Diffusion model against real held-out cases (the bundled model's card numbers).

Measures, on N synthetic samples vs the real test cases (preprocessed exactly as in training):
  * per-class median label volume (target: within +-20 % of the real median),
  * fraction of samples containing every foreground class (target: >= 90 %),
  * mean image intensity per class, and whether the classes are ordered as in the real data,
and writes JSON + Markdown + a real-vs-synthetic montage PNG.

    python benchmarks/bundled_quality.py --model src/duodiff/weights/hippocampus \
        --data ../shared/data/msd_hippocampus --split examples/hippocampus/split.json --out docs/results/bundled
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def load_real(model, data_root: str, split_file: str, subset: str,
              resample: bool = False) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The real cases of ``subset``, preprocessed as in training (resampled to the model's spacing if asked)."""
    from duodiff.train.data import load_split_cases

    c = model.config
    images, labels, names = load_split_cases(data_root, split_file, subset, c.volume_shape, c.num_classes,
                                             target_spacing=tuple(c.spacing) if resample else (),
                                             intensity_percentiles=c.intensity_percentiles)
    return images, labels.long(), names


def label_stats(images: torch.Tensor, labels: torch.Tensor, names: list[str]) -> dict:
    """Per-class volumes (voxels), presence and mean intensity."""
    out: dict = {"volume": {}, "mean_intensity": {}, "all_classes_present": 0.0}
    present = torch.ones(labels.shape[0], dtype=torch.bool)
    for k, name in enumerate(names):
        mask = labels[:, 0] == k
        vol = mask.flatten(1).sum(1).float()
        if k > 0:
            present &= vol > 0
            out["volume"][name] = vol.tolist()
        inten = [(images[i, 0][mask[i]].mean().item() if mask[i].any() else float("nan")) for i in range(len(vol))]
        out["mean_intensity"][name] = inten
    out["all_classes_present"] = float(present.float().mean())
    return out


def summarise(real: dict, synth: dict, names: list[str]) -> dict:
    rows = {}
    for name in names[1:]:
        r, s = np.median(real["volume"][name]), np.median(synth["volume"][name])
        rows[name] = {"real_median_voxels": float(r), "synthetic_median_voxels": float(s),
                      "relative_difference": float((s - r) / r), "within_20pct": bool(abs(s - r) <= 0.2 * r)}
    real_int = {n: float(np.nanmean(real["mean_intensity"][n])) for n in names}
    synth_int = {n: float(np.nanmean(synth["mean_intensity"][n])) for n in names}
    order_real = sorted(names, key=real_int.get)
    order_synth = sorted(names, key=synth_int.get)
    # how sure each ordering is: per-volume difference of adjacent classes (real order), 95 % bootstrap CI
    gaps = []
    for lo, hi in zip(order_real, order_real[1:]):
        gap = {"lower": lo, "higher": hi}
        for kind, d in (("real", real), ("synthetic", synth)):
            diff = np.asarray(d["mean_intensity"][hi], float) - np.asarray(d["mean_intensity"][lo], float)
            gap[kind] = bootstrap_mean_ci(diff[np.isfinite(diff)])
        gaps.append(gap)
    return {
        "volume": rows,
        "all_classes_present": {"real": real["all_classes_present"], "synthetic": synth["all_classes_present"],
                                "target_met": synth["all_classes_present"] >= 0.9},
        "mean_intensity": {"real": real_int, "synthetic": synth_int, "order_real": order_real,
                           "order_synthetic": order_synth, "same_order": order_real == order_synth,
                           "adjacent_gaps": gaps},
    }


def bootstrap_mean_ci(x: np.ndarray, *, n: int = 2000, seed: int = 0) -> dict:
    """Mean of ``x`` with a 95 % percentile-bootstrap interval (seeded)."""
    if len(x) == 0:
        return {"mean": float("nan"), "ci95": [float("nan"), float("nan")], "n": 0}
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), (n, len(x)))].mean(1)
    return {"mean": float(x.mean()), "ci95": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))],
            "n": int(len(x))}


def to_markdown(s: dict, meta: dict) -> str:
    lines = [f"# Quality of `{meta['model']}` vs real {meta['subset']} cases", "",
             f"{meta['num_samples']} samples ({meta['sampler']}), {meta['num_real']} real cases, "
             f"{meta['seconds']:.0f} s on {meta['device']}.", "",
             "| class | real median volume (voxels) | synthetic median | difference | within ±20 % |",
             "|---|---|---|---|---|"]
    for name, r in s["volume"].items():
        lines.append(f"| {name} | {r['real_median_voxels']:.0f} | {r['synthetic_median_voxels']:.0f} | "
                     f"{100 * r['relative_difference']:+.1f} % | {'yes' if r['within_20pct'] else 'no'} |")
    a = s["all_classes_present"]
    lines += ["", f"Samples containing every foreground class: {100 * a['synthetic']:.1f} % "
              f"(real: {100 * a['real']:.1f} %; target >= 90 %: {'met' if a['target_met'] else 'NOT met'}).", "",
              "| class | real mean intensity | synthetic mean intensity |", "|---|---|---|"]
    m = s["mean_intensity"]
    for name in m["real"]:
        lines.append(f"| {name} | {m['real'][name]:.3f} | {m['synthetic'][name]:.3f} |")
    lines += ["", f"Intensity order (low to high): real {m['order_real']}, synthetic {m['order_synthetic']} — "
              f"{'same order' if m['same_order'] else 'DIFFERENT order'}.", "",
              "Per-volume gap between adjacent classes of the real order (mean, 95 % bootstrap interval):", "",
              "| gap | real | synthetic |", "|---|---|---|"]
    for g in m["adjacent_gaps"]:
        cells = [f"{g[k]['mean']:+.3f} [{g[k]['ci95'][0]:+.3f}, {g[k]['ci95'][1]:+.3f}]" for k in ("real", "synthetic")]
        lines.append(f"| {g['higher']} − {g['lower']} | {cells[0]} | {cells[1]} |")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--variant", default=None, choices=["fp16"], help="weights variant (the bundled model is fp16)")
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", required=True)
    ap.add_argument("--subset", default="test")
    ap.add_argument("-n", "--num-samples", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--conditioning-scale", type=float, default=1.0)
    ap.add_argument("--resample", action="store_true",
                    help="resample real cases to the model's spacing (models trained with target_spacing)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()

    from duodiff import DuoDiffusion
    from duodiff.preview import plot_pairs

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = DuoDiffusion.from_pretrained(args.model, variant=args.variant)
    names = list(pipe.config.label_names)
    real_img, real_lab, real_names = load_real(pipe, args.data, args.split, args.subset, args.resample)
    t0 = time.perf_counter()
    s = pipe.sample(args.num_samples, seed=args.seed, num_inference_steps=args.steps, dtype=args.dtype,
                    batch_size=args.batch_size, conditioning_scale=args.conditioning_scale,
                    progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    summary = summarise(label_stats(real_img, real_lab, names), label_stats(s.images, s.labels, names), names)
    meta = {"model": args.model, "subset": args.subset, "num_samples": args.num_samples, "num_real": len(real_names),
            "sampler": f"DDIM-{args.steps} {args.dtype}, conditioning_scale {args.conditioning_scale:g}",
            "seconds": seconds, "device": str(pipe.device),
            "seed": args.seed, "torch_threads": torch.get_num_threads()}
    (out / "quality.json").write_text(json.dumps({"meta": meta, **summary}, indent=2))
    (out / "quality.md").write_text(to_markdown(summary, meta))
    k = min(4, len(real_img), len(s.images))
    plot_pairs([real_img[i, 0].numpy() for i in range(k)] + [s.images[i, 0].numpy() for i in range(k)],
               [real_lab[i, 0].numpy() for i in range(k)] + [s.labels[i, 0].numpy() for i in range(k)],
               out / "real_vs_synthetic.png",
               titles=[f"real {n}" for n in real_names[:k]] + [f"synthetic seed {x}" for x in s.seeds[:k]],
               num_classes=len(names), label_names=names)
    print(to_markdown(summary, meta))


if __name__ == "__main__":
    main()

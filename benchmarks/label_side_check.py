"""Cheap check of a model's label side alone: sampled label maps against real cases of a split.

Runs stage 1 only (``DuoDiffusion.sample_labels``; no image UNet, ControlNet or image decoder), so it works on a run
folder whose image stages are not trained yet, and takes a minute on a CPU. Reports, per foreground class, the median
volume of real and synthetic maps (voxels) and their difference, the share of maps holding the class in one connected
component (26-connectivity), and the share of maps holding every class (``duodiff.metrics.label_statistics``).

Use it to choose on training or validation cases while a model trains; the full check is ``duodiff evaluate``.

    python benchmarks/label_side_check.py --model runs/liver/model --data ../shared/data/chaos_mr_t2 \\
        --split examples/liver/split.json --subset train --resample -n 32 --out benchmarks/results/liver_labels.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def check(model: str, data: str, split: str, subset: str, *, resample: bool, num_samples: int, steps: int,
          seed: int, batch_size: int, dtype: str) -> dict:
    """Sample ``num_samples`` label maps and compare them with the ``subset`` cases; returns the summary dict."""
    from duodiff import DuoDiffusion
    from duodiff.train.data import load_split_cases

    pipe = DuoDiffusion.from_pretrained(model)
    c = pipe.config
    _, real, names = load_split_cases(data, split, subset, c.volume_shape, c.num_classes,
                                      target_spacing=tuple(c.spacing) if resample else (),
                                      intensity_percentiles=c.intensity_percentiles)
    t0 = time.perf_counter()
    synth = pipe.sample_labels(num_samples, seed=seed, num_inference_steps=steps, batch_size=batch_size,
                               dtype=dtype, progress=False)
    seconds = time.perf_counter() - t0
    return {"model": model, "subset": subset, "num_real": len(names), "num_samples": num_samples,
            "num_inference_steps": steps, "seed": seed, "dtype": dtype, "seconds": round(seconds, 1),
            **compare(real.long(), synth, c.label_names)}


def compare(real: torch.Tensor, synthetic: torch.Tensor, label_names: list[str] | tuple[str, ...]) -> dict:
    """``{"all_classes_fraction", "classes": {name: {...}}}`` for int label maps ``real`` ``(N, 1, H, W, D)`` and
    ``synthetic`` ``(M, 1, H, W, D)``: median volumes (voxels), their difference (%), one-component shares."""
    from duodiff.metrics.labels import label_statistics

    stats = label_statistics(real, synthetic, num_classes=len(label_names), label_names=label_names)
    rows = {}
    for name in label_names[1:]:  # spacing 1: volumes in voxels
        entry = stats["classes"][name]
        vr, vs = entry["volume_mm3"]["real"]["median"], entry["volume_mm3"]["synthetic"]["median"]
        comp = entry.get("components", {})
        rows[name] = {
            "real_median_voxels": vr,
            "synthetic_median_voxels": vs,
            "difference_percent": 100 * (vs / vr - 1) if vr > 0 else None,
            "single_component_real": comp.get("real", {}).get("fraction_single"),
            "single_component_synthetic": comp.get("synthetic", {}).get("fraction_single"),
            "mean_components_synthetic": comp.get("synthetic", {}).get("mean"),
        }
    return {"all_classes_fraction": stats["all_classes_fraction"], "classes": rows}


def to_markdown(r: dict) -> str:
    lines = [f"Label side of `{r['model']}`: {r['num_samples']} samples (DDIM-{r['num_inference_steps']}, "
             f"{r['dtype']}, seed {r['seed']}) vs {r['num_real']} real `{r['subset']}` cases, {r['seconds']} s.", "",
             "| class | real median (voxels) | synthetic median | difference | one component, real / synthetic "
             "| mean components (synthetic) |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, x in r["classes"].items():
        def pct(v):
            return "n/a" if v is None else f"{100 * v:.0f} %"

        def diff(v):
            return "n/a" if v is None else f"{v:+.1f} %"

        def num(v):  # None: no scipy / scikit-image for connected components
            return "n/a" if v is None else f"{v:.2f}"
        lines.append(f"| {name} | {x['real_median_voxels']:.0f} | {x['synthetic_median_voxels']:.0f} | "
                     f"{diff(x['difference_percent'])} | {pct(x['single_component_real'])} / "
                     f"{pct(x['single_component_synthetic'])} | {num(x['mean_components_synthetic'])} |")
    a = r["all_classes_fraction"]
    lines += ["", f"Maps holding every class: real {100 * a['real']:.0f} %, synthetic {100 * a['synthetic']:.0f} %."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model folder or Hub id")
    p.add_argument("--data", required=True, help="dataset folder of the real cases")
    p.add_argument("--split", required=True, help="split JSON with 'train' / 'val' / 'test' case lists")
    p.add_argument("--subset", default="train", help="which cases of the split to compare with (default train)")
    p.add_argument("--resample", action="store_true", help="resample real cases to the model's spacing")
    p.add_argument("-n", "--num-samples", type=int, default=32)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50, as duodiff evaluate)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="write the summary here (.json; a .md beside it)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    r = check(a.model, a.data, a.split, a.subset, resample=a.resample, num_samples=a.num_samples, steps=a.steps,
              seed=a.seed, batch_size=a.batch_size, dtype=a.dtype)
    md = to_markdown(r)
    print(md)
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(r, indent=1) + "\n")
        out.with_suffix(".md").write_text(md)


if __name__ == "__main__":
    main()

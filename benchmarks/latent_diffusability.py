"""How diffusable is a model's image latent? Per-channel statistics of the real cases' latents.

A latent diffusion model can only generate the structure it can predict from a noisy latent. A latent whose
channels are spatially white (lag-1 autocorrelation near 0) or checkerboard-like (negative) is close to
unpredictable: the UNet then samples independent values per voxel, which the decoder renders as noise texture.
For each model and each latent channel this prints and saves: the standard deviation of the scaled posterior mean,
the mean posterior sigma (a channel whose sigma is near 1 carries almost nothing: KL collapse) and the lag-1
spatial autocorrelation (mean of the three axes, per-channel mean removed). For reference the same autocorrelation
of the image itself, average-pooled to the latent's grid, is reported. Writes Markdown + JSON.

    python benchmarks/latent_diffusability.py --model shipped=bundled \
        --model recipe=benchmarks/models/hippocampus_image_2x_l8/model \
        --data ../shared/data/msd_hippocampus --split examples/hippocampus/split.json --subset val \
        --out docs/results/training/latent_diffusability
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F


def lag1_autocorrelation(x: torch.Tensor) -> torch.Tensor:
    """Per-channel lag-1 spatial autocorrelation of ``x`` ``(N, C, H, W, D)``, mean of the 3 axes -> ``(C,)``."""
    x = x - x.mean(dim=(0, 2, 3, 4), keepdim=True)
    var = x.pow(2).mean(dim=(0, 2, 3, 4))
    acs = []
    for dim in (2, 3, 4):
        a = x.narrow(dim, 1, x.shape[dim] - 1)
        b = x.narrow(dim, 0, x.shape[dim] - 1)
        acs.append((a * b).mean(dim=(0, 2, 3, 4)) / var.clamp_min(1e-12))
    return torch.stack(acs).mean(0)


def latent_stats(pipe, images: torch.Tensor) -> dict:
    """Statistics of ``pipe``'s image latent of ``images`` (float32 ``(N, 1, H, W, D)`` in [0, 1])."""
    ae = pipe.image_autoencoder.float().eval()
    with torch.no_grad():
        mu, sigma = ae.encode(images)
    z = mu * pipe.config.image_scale_factor
    ac = lag1_autocorrelation(z)
    std = z.std(dim=(0, 2, 3, 4))
    factor = images.shape[2] // z.shape[2]
    img_ac = float(lag1_autocorrelation(F.avg_pool3d(images, factor) if factor > 1 else images)[0])
    return {
        "latent_shape": list(z.shape[1:]),
        "channels": [{"std": round(float(s), 3), "posterior_sigma": round(float(g), 3),
                      "lag1_autocorr": round(float(a), 3)}
                     for s, g, a in zip(std, sigma.mean(dim=(0, 2, 3, 4)), ac)],
        "lag1_autocorr_var_weighted": round(float((ac * std.pow(2)).sum() / std.pow(2).sum()), 3),
        "image_lag1_autocorr_at_latent_grid": round(img_ac, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, help="NAME=FOLDER or NAME=bundled (repeat)")
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", required=True)
    ap.add_argument("--subset", default="val")
    ap.add_argument("--num-cases", type=int, default=8)
    ap.add_argument("--out", required=True, help="output path without suffix (.md and .json are written)")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from unet_noise_error import load_model_and_cases

    rows = {}
    for spec in args.model:
        name, where, pipe, images = load_model_and_cases(spec, args.data, args.split, args.subset)
        rows[name] = {"model": where, **latent_stats(pipe, images[: args.num_cases].float())}
        print(name, json.dumps(rows[name]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [f"# Image-latent diffusability ({args.subset} cases, first {args.num_cases})", "",
             "Command: `python benchmarks/latent_diffusability.py " + " ".join(f"--model {m}" for m in args.model)
             + f" --data {args.data} --split {args.split} --subset {args.subset} --out {args.out}`", "",
             "| model | latent | lag-1 autocorr (variance-weighted) | image at latent grid "
             "| per channel: std / sigma / autocorr |",
             "|---|---|---|---|---|"]
    for name, r in rows.items():
        per = "; ".join(f"{c['std']:.2f} / {c['posterior_sigma']:.2f} / {c['lag1_autocorr']:+.2f}"
                        for c in r["channels"])
        lines.append(f"| {name} | {' x '.join(map(str, r['latent_shape']))} | {r['lag1_autocorr_var_weighted']:+.3f} | "
                     f"{r['image_lag1_autocorr_at_latent_grid']:+.3f} | {per} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()

"""Per-timestep noise-prediction error of a model's image UNet on real cases: where does the diffusion model fail?

For each model: the real cases' image latents (posterior mean x the model's scale factor) are noised at timestep t
with the model's own DDPM schedule, the image UNet (no ControlNet) predicts the noise once, and the mean squared
error is reported (predicting zeros scores ~1.0; an epsilon model must be near 0 at high t). Writes Markdown + JSON.

    python benchmarks/unet_noise_error.py --model shipped=bundled \
        --model recipe=benchmarks/models/hippocampus_image_2x_l8/model \
        --data ../shared/data/msd_hippocampus --split examples/hippocampus/split.json --subset val \
        --out docs/results/training/recipe_2x_l8_val/unet_noise_error
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def noise_error(pipe, images: torch.Tensor, timesteps: list[int], seed: int = 0) -> dict[int, float]:
    """``{t: MSE}`` of the image UNet's noise prediction. images: float32 ``(N, 1, H, W, D)`` in [0, 1]."""
    from monai.networks.schedulers import DDPMScheduler

    sc = pipe.config.scheduler
    if sc.prediction_type != "epsilon":
        raise ValueError(f"Only epsilon models are measured here, got prediction_type={sc.prediction_type!r}.")
    sched = DDPMScheduler(num_train_timesteps=sc.num_train_timesteps, schedule=sc.schedule,
                          beta_start=sc.beta_start, beta_end=sc.beta_end)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    with torch.no_grad():
        z0 = pipe.image_autoencoder.encode(images)[0] * pipe.config.image_scale_factor
        for t in timesteps:
            noise = torch.randn(z0.shape, generator=gen)
            ab = sched.alphas_cumprod[t]
            zt = ab.sqrt() * z0 + (1 - ab).sqrt() * noise
            eps = pipe.image_unet(zt, timesteps=torch.full((len(z0),), t, dtype=torch.long))
            out[t] = float(((eps - noise) ** 2).mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, help="NAME=FOLDER or NAME=bundled (repeat)")
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", required=True)
    ap.add_argument("--subset", default="val")
    ap.add_argument("--num-cases", type=int, default=4)
    ap.add_argument("--timesteps", type=int, nargs="+", default=[50, 200, 500, 800, 950])
    ap.add_argument("--out", required=True, help="output path without suffix (.md and .json are written)")
    args = ap.parse_args()
    from duodiff import DuoDiffusion, load_bundled
    from duodiff.train.data import load_split_cases

    rows = {}
    for spec in args.model:
        name, _, where = spec.partition("=")
        pipe = load_bundled() if where == "bundled" else DuoDiffusion.from_pretrained(where)
        c = pipe.config
        images, _, _ = load_split_cases(args.data, args.split, args.subset, c.volume_shape, c.num_classes,
                                        intensity_percentiles=c.intensity_percentiles)
        rows[name] = {"model": where, "latent_shape": list(c.image_latent_shape),
                      "mse": noise_error(pipe, images[: args.num_cases], args.timesteps)}
        print(name, rows[name]["mse"], flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"subset": args.subset, "num_cases": args.num_cases,
                                                    "models": rows}, indent=1))
    names = list(rows)
    lines = [f"# Image-UNet noise-prediction MSE per timestep ({args.num_cases} {args.subset} cases)", "",
             "| t | " + " | ".join(f"{n} (latent {'x'.join(map(str, rows[n]['latent_shape']))})" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for t in args.timesteps:
        lines.append(f"| {t} | " + " | ".join(f"{rows[n]['mse'][t]:.4f}" for n in names) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

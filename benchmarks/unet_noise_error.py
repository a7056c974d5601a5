"""Per-timestep noise-prediction error of a model's image UNet on real cases: where does the diffusion model fail?

For each model: the real cases' image latents (posterior mean x the model's scale factor) are noised at timestep t
with the model's own DDPM schedule, the image UNet (no ControlNet) predicts the noise once (a v-prediction model:
the noise its v implies), and the mean squared error is reported (predicting zeros scores ~1.0). Also reported: the
error of the clean-latent estimate DDIM steps towards, x0-MSE = eps-MSE * (1 - alpha-bar) / alpha-bar, in units of
the latent's variance (~1): an epsilon model must be near 0 at high t, or its samples drift. Writes Markdown + JSON.

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

    sc = pipe.config.schedule_of("image")
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
            pred = pipe.image_unet(zt, timesteps=torch.full((len(z0),), t, dtype=torch.long))
            if sc.prediction_type == "v_prediction":  # the noise a v model implies: eps = sqrt(ab) v + sqrt(1-ab) z_t
                pred = ab.sqrt() * pred + (1 - ab).sqrt() * zt
            elif sc.prediction_type != "epsilon":
                raise ValueError(f"Only epsilon and v models are measured here, got {sc.prediction_type!r}.")
            out[t] = float(((pred - noise) ** 2).mean())
    return out


def load_model_and_cases(spec: str, data: str, split: str, subset: str):
    """``(name, where, pipe, images)`` for a ``NAME=FOLDER`` or ``NAME=bundled`` spec: the model and its real
    ``subset`` cases prepared as it was trained (float32 ``(N, C, H, W, D)`` in [0, 1])."""
    from duodiff import DuoDiffusion, load_bundled
    from duodiff.train.data import load_split_cases

    name, _, where = spec.partition("=")
    pipe = load_bundled() if where == "bundled" else DuoDiffusion.from_pretrained(where)
    c = pipe.config
    images, _, _ = load_split_cases(data, split, subset, c.volume_shape, c.num_classes,
                                    intensity_percentiles=c.intensity_percentiles)
    return name, where, pipe, images


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
    rows = {}
    for spec in args.model:
        name, where, pipe, images = load_model_and_cases(spec, args.data, args.split, args.subset)
        c = pipe.config
        rows[name] = {"model": where, "latent_shape": list(c.image_latent_shape),
                      "mse": noise_error(pipe, images[: args.num_cases], args.timesteps)}
        print(name, rows[name]["mse"], flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"subset": args.subset, "num_cases": args.num_cases,
                                                    "models": rows}, indent=1))
    names = list(rows)
    from duodiff.schedulers import make_scheduler

    lines = [f"# Image-UNet noise-prediction MSE per timestep ({args.num_cases} {args.subset} cases)", "",
             "Command: `python benchmarks/unet_noise_error.py " + " ".join(f"--model {m}" for m in args.model)
             + f" --data {args.data} --split {args.split} --subset {args.subset} --out {args.out}`", "",
             "Each cell: noise MSE / clean-latent (x0) MSE.", "",
             "| t | " + " | ".join(f"{n} (latent {'x'.join(map(str, rows[n]['latent_shape']))})" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    ab = make_scheduler("ddpm", c.schedule_of("image")).alphas_cumprod
    for t in args.timesteps:
        x0 = {n: rows[n]["mse"][t] * float((1 - ab[t]) / ab[t]) for n in names}
        lines.append(f"| {t} | " + " | ".join(f"{rows[n]['mse'][t]:.4f} / {x0[n]:.3g}" for n in names) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

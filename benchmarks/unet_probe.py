"""Quick probe of an image-UNet architecture on a trained model's image latent: train a fresh UNet for a few hundred
steps (raw weights, no EMA) on the train cases' latents and report the per-timestep noise-prediction error on val
cases (benchmarks/unet_noise_error.py). For comparing UNet levers before a full `duodiff train` stage.

    python benchmarks/unet_probe.py --model benchmarks/models/hippocampus_image_2x_l8/model \
        --channels 32 64 64 64 --steps 500 --data ../shared/data/msd_hippocampus \
        --split examples/hippocampus/split.json --out benchmarks/results/unet_probe/c32.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--channels", type=int, nargs="+", required=True)
    ap.add_argument("--attention", type=int, nargs="+", default=None, help="1/0 per level (default: last two)")
    ap.add_argument("--norm-groups", type=int, default=16)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from unet_noise_error import noise_error

    from duodiff import DuoDiffusion
    from duodiff.models import build_component
    from duodiff.schedulers import make_scheduler
    from duodiff.train.data import load_split_cases
    from duodiff.train.stages import encode_latents

    pipe = DuoDiffusion.from_pretrained(args.model)
    c = pipe.config
    levels = len(args.channels)
    attention = (tuple(bool(a) for a in args.attention) if args.attention
                 else tuple(i >= levels - 2 for i in range(levels)))
    ucfg = c.image_unet.replace(channels=tuple(args.channels), num_res_blocks=(1,) * levels,
                                attention_levels=attention, norm_num_groups=args.norm_groups)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        cn = c.image_controlnet.replace(channels=ucfg.channels, num_res_blocks=ucfg.num_res_blocks,
                                        attention_levels=attention, norm_num_groups=args.norm_groups)
        unet = build_component("image_unet", c.replace(image_unet=ucfg, image_controlnet=cn))
    pipe.image_unet = unet
    train, _, _ = load_split_cases(args.data, args.split, "train", c.volume_shape, c.num_classes,
                                   intensity_percentiles=c.intensity_percentiles)
    val, _, _ = load_split_cases(args.data, args.split, "val", c.volume_shape, c.num_classes,
                                 intensity_percentiles=c.intensity_percentiles)
    z = encode_latents(pipe.image_autoencoder, train, device=torch.device("cpu")) * c.image_scale_factor
    sched = make_scheduler("ddpm", c.scheduler)
    gen = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr)
    unet.train()
    t0, losses = time.perf_counter(), []
    for step in range(args.steps):
        idx = torch.randint(0, len(z), (args.batch_size,), generator=gen)
        z0 = z[idx]
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, c.scheduler.num_train_timesteps, (len(z0),), generator=gen)
        loss = torch.nn.functional.mse_loss(unet(x=sched.add_noise(z0, noise, t), timesteps=t), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            print(f"step {step + 1} loss {sum(losses[-100:]) / 100:.4f} {time.perf_counter() - t0:.0f} s", flush=True)
    unet.eval()
    err = noise_error(pipe, val[:4], [50, 200, 500, 800, 950])
    out = {"channels": args.channels, "attention": attention, "norm_groups": args.norm_groups, "steps": args.steps,
           "batch_size": args.batch_size, "lr": args.lr, "seconds": time.perf_counter() - t0,
           "threads": torch.get_num_threads(), "parameters": sum(p.numel() for p in unet.parameters()),
           "final_loss_mean_last100": sum(losses[-100:]) / min(100, len(losses)), "noise_mse_val": err}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()

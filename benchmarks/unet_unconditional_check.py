"""Quick check of an image UNet training checkpoint before any ControlNet training: does it generate images?

Loads a model folder, replaces its image UNet by a `duodiff train` checkpoint's raw (`model`) and EMA (`ema`)
weights, and for each: the per-timestep noise error on real cases (benchmarks/unet_noise_error.py), 6
unconditional samples (DDIM-50 with the model's image schedule, no ControlNet, fp32, seed 0) decoded, their
latent standard deviation (real latents: ~1; an epsilon UNet that drifts ends at 5-70), their mean absolute
voxel-to-voxel difference ("tv", real scans ~0.09; noise-like images ~0.2) and a montage PNG (middle axial slice,
real val cases on top). Writes OUT.json and OUT_model.png / OUT_ema.png.

    python benchmarks/unet_unconditional_check.py --model runs/hippocampus_image_2x_l8_se_v/model \
        --checkpoint runs/hippocampus_image_2x_l8_se_v/checkpoints/image_unet/step-00000500 \
        --data ../shared/data/msd_hippocampus --split examples/hippocampus/split.json \
        --out docs/results/training/diffusability/v_2x_l8_se_step500
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def tv(v: torch.Tensor) -> float:
    """Mean absolute difference of neighbouring voxels of ``v`` ``(N, C, H, W, D)``, averaged over the 3 axes."""
    return float(sum(v.diff(dim=d).abs().mean() for d in (2, 3, 4)) / 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--checkpoint", required=True, help="a checkpoints/image_unet/step-N folder")
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", required=True)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--out", required=True, help="output path without suffix")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from safetensors.torch import load_file
    from unet_noise_error import noise_error

    from duodiff import DuoDiffusion
    from duodiff.schedulers import make_scheduler
    from duodiff.train.data import load_split_cases

    pipe = DuoDiffusion.from_pretrained(args.model)
    c = pipe.config
    val, _, _ = load_split_cases(args.data, args.split, "val", c.volume_shape, c.num_classes,
                                 intensity_percentiles=c.intensity_percentiles)
    val = val.float()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    res: dict = {"model": args.model, "checkpoint": Path(args.checkpoint).name,
                 "prediction_type": c.schedule_of("image").prediction_type}
    for kind in ("model", "ema"):
        state = load_file(str(Path(args.checkpoint) / f"{kind}.safetensors"))
        if kind == "ema":  # torch.optim.swa_utils.AveragedModel: "module." + the network's keys, and n_averaged
            state = {k[len("module."):]: v for k, v in state.items() if k.startswith("module.")}
        pipe.image_unet.load_state_dict(state)
        unet = pipe.image_unet.eval()
        errors = noise_error(pipe, val[:4], [50, 200, 500, 800, 950])
        sched = make_scheduler("ddim", c.schedule_of("image"))
        sched.set_timesteps(args.steps)
        z = torch.randn((6, *c.image_latent_shape), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            for t in sched.timesteps:
                pred = unet(z, timesteps=torch.full((len(z),), int(t), dtype=torch.long))
                z, _ = sched.step(pred, int(t), z)
            img = pipe.image_autoencoder.decode(z / c.image_scale_factor).clamp(0, 1)
        res[kind] = {"noise_error": errors, "tv_samples": tv(img), "tv_real": tv(val[:6]),
                     "latent_std_samples": float(z.std())}
        print(kind, json.dumps(res[kind]), flush=True)
        fig, ax = plt.subplots(2, 6, figsize=(12, 4))
        mid = c.volume_shape[2] // 2
        for i in range(6):
            ax[0, i].imshow(val[i, 0, :, :, mid].T, cmap="gray", vmin=0, vmax=1)
            ax[1, i].imshow(img[i, 0, :, :, mid].T, cmap="gray", vmin=0, vmax=1)
            ax[0, i].axis("off")
            ax[1, i].axis("off")
        fig.suptitle(f"{Path(args.checkpoint).name} ({kind} weights, {res['prediction_type']}): real val cases (top) "
                     "vs unconditional samples (bottom)")
        fig.savefig(f"{out}_{kind}.png", dpi=80)
        plt.close(fig)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()

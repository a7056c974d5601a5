"""Where the grain of synthetic images comes from, and whether a decoder removes it (issue 12).

For the first model given, on N real cases of a split subset:

1. **Latent statistics.** The real image latents (posterior mean x scale factor) vs latents sampled by the model's
   image UNet + ControlNet for the same cases' labels (DDIM-50, fp32, seeds 0..N-1): standard deviation, mean
   absolute neighbour difference and high-pass energy (latent minus its 3x3x3 box mean).
2. **Clean-latent error at small t.** The real latents noised at t, one v / epsilon prediction with the ControlNet
   given the real label, and the std of the implied clean-latent estimate's error next to the std of the noise
   that was added (in clean-latent units, sqrt((1 - a) / a)). An error near the added noise means the UNet cannot
   tell fine latent detail from noise: the last sampling steps leave that detail random.
3. **Per decoder** (every ``--model``; they must share the encoder and scale factor, e.g. decoder-only
   fine-tunes): the mean absolute neighbour difference ("tv") of the decoded real latents (reconstructions) and of
   the decoded sampled latents, next to the real images' tv; and the reconstruction L1. A decoder that turns
   random latent detail into grain gives samples a higher tv than real images.

Writes OUT.json and OUT.md.

    python benchmarks/decoder_grain.py --model bundled=runs/hippocampus_final/model \
        --model noise03=runs/final_decnoise/model --data ../shared/data/msd_hippocampus \
        --split examples/hippocampus/split.json --subset val --out docs/results/training/decoder_noise/grain
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def tv(v: torch.Tensor) -> float:
    """Mean absolute difference of neighbouring voxels of ``v`` ``(N, C, H, W, D)``, averaged over the 3 axes."""
    return float(sum(v.diff(dim=d).abs().mean() for d in (2, 3, 4)) / 3)


def high_pass_energy(z: torch.Tensor) -> float:
    """Mean squared difference between ``z`` ``(N, C, h, w, d)`` and its 3x3x3 box mean (replicate padding)."""
    k = torch.full((z.shape[1], 1, 3, 3, 3), 1 / 27)
    return float((z - F.conv3d(F.pad(z, (1,) * 6, mode="replicate"), k, groups=z.shape[1])).pow(2).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, help="NAME=FOLDER; the first one samples")
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", required=True)
    ap.add_argument("--subset", default="val")
    ap.add_argument("-n", type=int, default=8, help="cases and samples")
    ap.add_argument("--timesteps", default="5,20,50,100,200")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True, help="output path without suffix")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from duodiff import DuoDiffusion
    from duodiff.sampling import denoise, model_output
    from duodiff.schedulers import make_scheduler
    from duodiff.train.data import load_split_cases

    start = time.time()
    models = dict(m.split("=", 1) for m in args.model)
    pipes = {k: DuoDiffusion.from_pretrained(v) for k, v in models.items()}
    first = next(iter(pipes.values()))
    c = first.config
    images, labels, names = load_split_cases(args.data, args.split, args.subset, c.volume_shape, c.num_classes,
                                             intensity_percentiles=c.intensity_percentiles)
    x, y = images[: args.n].float(), labels[: args.n].long()
    cond = first.one_hot(y)
    res: dict = {"models": models, "cases": names[: args.n], "subset": args.subset,
                 "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                            f"{args.threads} thread(s)"}
    with torch.no_grad():
        z_real = first.image_autoencoder.encode(x)[0] * c.image_scale_factor
        sched = make_scheduler("ddim", c.schedule_of("image"))
        sched.set_timesteps(50)
        gens = [torch.Generator().manual_seed(i) for i in range(args.n)]
        noise = torch.stack([torch.randn(c.image_latent_shape, generator=g) for g in gens])
        z_smp = denoise(first.image_unet, sched, noise, generators=gens, stochastic=False,
                        controlnet=first.image_controlnet, condition=cond, progress=False)
        res["latents"] = {name: {"std": float(z.std()), "tv": tv(z), "high_pass_energy": high_pass_energy(z)}
                          for name, z in (("real", z_real), ("sampled", z_smp))}
        sc = c.schedule_of("image")
        ab_all = make_scheduler("ddpm", sc).alphas_cumprod
        g = torch.Generator().manual_seed(0)
        rows = []
        for t in (int(s) for s in args.timesteps.split(",")):
            ab = ab_all[t]
            eps = torch.randn(z_real.shape, generator=g)
            zt = ab.sqrt() * z_real + (1 - ab).sqrt() * eps
            out = model_output(first.image_unet, zt, torch.full((args.n,), t), controlnet=first.image_controlnet,
                               condition=cond)
            if sc.prediction_type == "v_prediction":
                x0 = ab.sqrt() * zt - (1 - ab).sqrt() * out
            else:
                x0 = (zt - (1 - ab).sqrt() * out) / ab.sqrt()
            rows.append({"t": t, "x0_error_std": float((x0 - z_real).std()),
                         "added_noise_std": float(((1 - ab) / ab).sqrt())})
        res["clean_latent_error"] = rows
        res["real_images_tv"] = tv(x)
        res["decoders"] = {}
        for name, p in pipes.items():
            s = p.config.image_scale_factor
            rec = p.image_autoencoder.decode(z_real / s).clamp(0, 1)
            smp = p.image_autoencoder.decode(z_smp / s).clamp(0, 1)
            res["decoders"][name] = {"reconstruction_tv": tv(rec), "sample_tv": tv(smp),
                                     "reconstruction_l1": float((rec - x).abs().mean())}
    res["seconds"] = round(time.time() - start, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    lat = res["latents"]
    md = [f"# Decoder grain check ({args.subset}, {args.n} cases; {res['machine']}, {res['seconds']} s)", "",
          "`python benchmarks/decoder_grain.py " + " ".join(f"--model {k}={v}" for k, v in models.items())
          + f" --subset {args.subset} -n {args.n} ...`", "",
          "| latents (scaled) | std | neighbour difference | high-pass energy |", "|---|---|---|---|"]
    md += [f"| {k} | {v['std']:.3f} | {v['tv']:.4f} | {v['high_pass_energy']:.4f} |" for k, v in lat.items()]
    md += ["", "| t | clean-latent error std | added noise std |", "|---|---|---|"]
    md += [f"| {r['t']} | {r['x0_error_std']:.3f} | {r['added_noise_std']:.3f} |" for r in rows]
    md += ["", f"| decoder | reconstruction tv | sample tv (real images: {res['real_images_tv']:.4f}) | "
               "reconstruction L1 |", "|---|---|---|---|"]
    md += [f"| {k} | {v['reconstruction_tv']:.4f} | {v['sample_tv']:.4f} | {v['reconstruction_l1']:.4f} |"
           for k, v in res["decoders"].items()]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()

"""Image-autoencoder ablation on a fixed split: one lever at a time, validation PSNR / SSIM / L1 over training.

Trains a MONAI ``AutoencoderKL`` (built from a duodiff :class:`~duodiff.config.AutoencoderConfig`, exactly as a
pipeline builds it) on the *train* cases of a split and measures reconstruction of the *val* cases (posterior
mean, clamped to [0, 1]) every ``--eval-every`` steps. Losses: L1 + ``kl_weight`` KL (duodiff's image stage),
optionally + ``ssim_weight`` * (1 - SSIM) (MONAI ``SSIMLoss``). The test cases are never read.

    DUODIFF_DATA=../shared/data OMP_NUM_THREADS=1 python benchmarks/ae_ablation.py --name 2x_l4 \\
        --channels 32 64 --latent-channels 4 --steps 600 --out benchmarks/results/ae_ablation

Writes ``<out>/<name>.json`` (config, curve, final metrics, wall time, threads) and
``<out>/<name>.safetensors`` (fp16 weights, so a winner can seed the stage's training).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from duodiff.config import AutoencoderConfig
from duodiff.models import build_autoencoder
from duodiff.train.data import load_split_cases
from duodiff.train.stages import kl_loss

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-volume PSNR (dB, data range 1) of float ``(N, C, H, W, D)`` volumes in [0, 1]: ``(N,)``."""
    mse = (x - y).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(1.0 / mse)


@torch.inference_mode()
def evaluate(ae: torch.nn.Module, images: torch.Tensor, batch_size: int = 4) -> dict[str, float]:
    """Mean PSNR (dB), SSIM (MONAI ``SSIMMetric``: 3D, Gaussian window 11, sigma 1.5) and L1 of reconstructions.

    Reconstructions decode the posterior mean and are clamped to [0, 1].
    """
    from monai.metrics import SSIMMetric

    ae.eval()
    ssim = SSIMMetric(spatial_dims=3, data_range=1.0, reduction="none")
    ps, ss, l1 = [], [], []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        mu, _ = ae.encode(x)
        rec = ae.decode(mu).float().clamp(0, 1)
        ps.append(psnr(rec, x))
        ss.append(ssim(rec, x).flatten())
        l1.append((rec - x).abs().flatten(1).mean(1))
    ae.train()
    return {"psnr": float(torch.cat(ps).mean()), "ssim": float(torch.cat(ss).mean()), "l1": float(torch.cat(l1).mean())}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True)
    p.add_argument("--data", default=os.path.join(os.environ.get("DUODIFF_DATA", "../shared/data"), "msd_hippocampus"))
    p.add_argument("--split", default=str(ROOT / "examples" / "hippocampus" / "split.json"))
    p.add_argument("--shape", type=int, nargs=3, default=(32, 48, 32))
    p.add_argument("--channels", type=int, nargs="+", default=(32, 64))
    p.add_argument("--latent-channels", type=int, default=4)
    p.add_argument("--num-res-blocks", type=int, default=1)
    p.add_argument("--norm-num-groups", type=int, default=16)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--ssim-weight", type=float, default=0.0)
    p.add_argument("--amp", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default="", help="folder for the preprocessed split arrays (.pt), reused across runs")
    p.add_argument("--out", default=str(HERE / "results" / "ae_ablation"))
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)

    arrays = {}
    for subset in ("train", "val"):
        cached = Path(a.cache) / f"{subset}_{'x'.join(map(str, a.shape))}.pt" if a.cache else None
        if cached is not None and cached.is_file():
            arrays[subset] = torch.load(cached)["images"]
            continue
        x, y, names = load_split_cases(a.data, a.split, subset, a.shape, num_classes=3)
        arrays[subset] = x
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"images": x, "labels": y, "names": names}, cached)
    train_x, val_x = arrays["train"], arrays["val"]

    levels = len(a.channels)
    cfg = AutoencoderConfig(
        in_channels=train_x.shape[1], out_channels=train_x.shape[1], channels=tuple(a.channels),
        num_res_blocks=(a.num_res_blocks,) * levels, attention_levels=(False,) * levels,
        latent_channels=a.latent_channels, norm_num_groups=a.norm_num_groups,
    )
    g = torch.Generator().manual_seed(a.seed)
    with torch.random.fork_rng():
        torch.manual_seed(a.seed)  # MONAI layers initialise from the global RNG; forked, so nothing leaks
        ae = build_autoencoder(cfg)
    opt = torch.optim.AdamW(ae.parameters(), lr=a.lr)
    ssim_loss = None
    if a.ssim_weight:
        from monai.losses import SSIMLoss

        ssim_loss = SSIMLoss(spatial_dims=3, data_range=1.0)
    latent_shape = (a.latent_channels, *(s // cfg.downsample_factor for s in a.shape))
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if a.amp == "bfloat16" else torch.autocast("cpu", enabled=False)
    warmup = max(1, a.steps // 20)
    curve, t0 = [], time.perf_counter()
    bar = tqdm(range(1, a.steps + 1), desc=a.name, disable=a.no_progress)
    for step in bar:
        lr = a.lr * (step / warmup if step <= warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) /
                                                                           max(1, a.steps - warmup))))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(train_x), (a.batch_size,), generator=g)
        x = train_x[idx]
        eps = torch.randn((a.batch_size, *latent_shape), generator=g)
        with amp:
            mu, sigma = ae.encode(x)
            rec = ae.decode(mu + sigma * eps.to(mu.dtype))
        rec = rec.float()
        loss = F.l1_loss(rec, x) + a.kl_weight * kl_loss(mu, sigma)
        if ssim_loss is not None:
            loss = loss + a.ssim_weight * ssim_loss(rec.clamp(0, 1), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
        opt.step()
        if step % a.eval_every == 0 or step == a.steps:
            m = evaluate(ae, val_x)
            curve.append({"step": step, "seconds": round(time.perf_counter() - t0, 1), "train_loss": float(loss),
                          **{f"val_{k}": round(v, 4) for k, v in m.items()}})
            bar.set_postfix(psnr=f"{m['psnr']:.2f}", ssim=f"{m['ssim']:.3f}")
            print(json.dumps(curve[-1]), flush=True)
    seconds = time.perf_counter() - t0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file({k: v.half().contiguous() for k, v in ae.state_dict().items()}, str(out / f"{a.name}.safetensors"))
    report = {
        "name": a.name, "config": cfg.to_dict(), "latent_shape": list(latent_shape),
        "compression": round(train_x[0].numel() / math.prod(latent_shape), 2),
        "params": sum(p.numel() for p in ae.parameters()),
        "steps": a.steps, "batch_size": a.batch_size, "lr": a.lr, "kl_weight": a.kl_weight,
        "ssim_weight": a.ssim_weight, "amp": a.amp, "seed": a.seed,
        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "seconds": round(seconds, 1), "final_val": curve[-1], "curve": curve,
        "split": Path(a.split).name, "val_cases": len(val_x),
    }
    (out / f"{a.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{a.name}: val PSNR {curve[-1]['val_psnr']:.2f} dB, SSIM {curve[-1]['val_ssim']:.3f}, "
          f"L1 {curve[-1]['val_l1']:.4f} in {seconds:.0f} s")


if __name__ == "__main__":
    main()

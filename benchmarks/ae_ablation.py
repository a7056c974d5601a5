"""Image-autoencoder ablation on a fixed split: one lever at a time, validation PSNR / SSIM / L1 over training.

Trains a MONAI ``AutoencoderKL`` (built from a duodiff :class:`~duodiff.config.AutoencoderConfig`, exactly as a
pipeline builds it) on the *train* cases of a split and measures reconstruction of the *val* cases (duodiff's
``image_reconstruction``: posterior mean, clamped to [0, 1]; PSNR, SSIM, L1) every ``--eval-every`` steps.
Losses: L1 + ``kl_weight`` KL (duodiff's image stage),
optionally + ``ssim_weight`` * (1 - SSIM) (MONAI ``SSIMLoss``), optionally on random patches — the trainer's
own ``autoencoder_loss``, so a setting found here means the same in
``[stages.image_autoencoder]``. The test cases are never read.

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
from tqdm.auto import tqdm

from duodiff.config import AutoencoderConfig
from duodiff.metrics import image_reconstruction
from duodiff.models import build_autoencoder
from duodiff.train.data import load_split_cases
from duodiff.train.loop import StepContext
from duodiff.train.stages import AutoencoderStep, autoencoder_loss

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def evaluate(ae: torch.nn.Module, images: torch.Tensor) -> dict[str, float]:
    """Mean PSNR (dB), SSIM and L1 of the reconstructions (:func:`duodiff.metrics.image_reconstruction`)."""
    r = image_reconstruction(ae, images, batch_size=4)
    ae.train()
    return {"psnr": r["psnr_db"]["mean"], "ssim": r["ssim"]["mean"], "l1": r["l1"]["mean"]}


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
    p.add_argument("--patch-size", type=int, nargs=3, default=None, help="train on random crops (H W D)")
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
    patch = tuple(a.patch_size) if a.patch_size else None
    latent_shape = (a.latent_channels, *(s // cfg.downsample_factor for s in a.shape))
    loss_fn = autoencoder_loss(train_x, torch.zeros(0), kind="image", num_classes=2, latent_shape=latent_shape,
                               kl_weight=a.kl_weight, dice_weight=0.0, ssim_weight=a.ssim_weight, patch_size=patch,
                               downsample_factor=cfg.downsample_factor)
    model = AutoencoderStep(ae)
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
        with amp:
            loss, _ = loss_fn(model, StepContext(step=step, indices=idx, generator=g, device=torch.device("cpu")))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
        opt.step()
        if step % a.eval_every == 0 or step == a.steps:
            m = evaluate(ae, val_x)
            curve.append({"step": step, "seconds": round(time.perf_counter() - t0, 1),
                          "train_loss": float(loss.detach()), **{f"val_{k}": round(v, 4) for k, v in m.items()}})
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
        "ssim_weight": a.ssim_weight, "patch_size": list(patch) if patch else None, "amp": a.amp, "seed": a.seed,
        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "seconds": round(seconds, 1), "final_val": curve[-1], "curve": curve,
        "split": Path(a.split).name, "val_cases": len(val_x),
    }
    (out / f"{a.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{a.name}: val PSNR {curve[-1]['val_psnr']:.2f} dB, SSIM {curve[-1]['val_ssim']:.3f}, "
          f"L1 {curve[-1]['val_l1']:.4f} in {seconds:.0f} s")


if __name__ == "__main__":
    main()

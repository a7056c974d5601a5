"""Image-autoencoder fidelity of several models on one subset of a split: a table and a before/after montage.

Each model's image autoencoder reconstructs the same real cases (posterior mean, clamped to [0, 1];
:func:`duodiff.metrics.image_reconstruction`), preprocessed as that model was trained. Choose recipes on ``val``;
report ``test`` once, at the end.

    DUODIFF_DATA=../shared/data OMP_NUM_THREADS=1 python benchmarks/ae_fidelity.py --subset val \\
        --model bundled=bundled --model 2x_l8=runs/hippocampus_image_2x_l8/model \\
        --out docs/results/training/image_ae_val

Writes ``<out>.json`` (per model: PSNR / SSIM / L1 summaries and per case, latent shape, compression) and
``<out>.png`` (middle axial slice of ``--cases`` cases: real, then each model's reconstruction and its absolute
error).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from duodiff import DuoDiffusion, load_bundled
from duodiff.metrics import image_reconstruction
from duodiff.metrics.autoencoder import reconstruct
from duodiff.train.data import load_split_cases

ROOT = Path(__file__).resolve().parents[1]


def load_model(spec: str) -> DuoDiffusion:
    """``"bundled"`` or a model folder / Hub id."""
    return load_bundled() if spec == "bundled" else DuoDiffusion.from_pretrained(spec)


def montage(real: torch.Tensor, recons: dict[str, torch.Tensor], names: list[str], out: Path) -> None:
    """Rows: cases; columns: real, then per model its reconstruction and |error| (middle slice of the last axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 1 + 2 * len(recons)
    fig, axes = plt.subplots(len(names), cols, figsize=(1.9 * cols, 2.0 * len(names)), squeeze=False)
    z = real.shape[-1] // 2
    for r, name in enumerate(names):
        panels = [("real", real[r, 0, :, :, z], "gray", 1.0)]
        for label, rec in recons.items():
            panels += [(label, rec[r, 0, :, :, z], "gray", 1.0),
                       (f"|{label} - real|", (rec[r, 0, :, :, z] - real[r, 0, :, :, z]).abs(), "magma", 0.3)]
        for c, (title, img, cmap, vmax) in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(np.rot90(img.numpy()), cmap=cmap, vmin=0.0, vmax=vmax)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=8)
        axes[r][0].set_ylabel(name, fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, help="NAME=bundled|FOLDER (repeatable)")
    p.add_argument("--data", default=os.path.join(os.environ.get("DUODIFF_DATA", "../shared/data"), "msd_hippocampus"))
    p.add_argument("--split", default=str(ROOT / "examples" / "hippocampus" / "split.json"))
    p.add_argument("--subset", default="val")
    p.add_argument("--cases", type=int, default=4, help="cases in the montage")
    p.add_argument("--out", required=True, help="output path without extension")
    a = p.parse_args(argv)

    results, recons, real_cases = {}, {}, None
    for spec in a.model:
        name, _, where = spec.partition("=")
        pipe = load_model(where or name).to(dtype=torch.float32)
        c = pipe.config
        t0 = time.perf_counter()
        images, _, names = load_split_cases(a.data, a.split, a.subset, c.volume_shape, c.num_classes,
                                            intensity_percentiles=c.intensity_percentiles)
        r = image_reconstruction(pipe.image_autoencoder, images, names=names, batch_size=4)
        latent = c.image_latent_shape
        results[name] = {
            "model": where or name, "latent_shape": list(latent),
            "compression": round(math.prod(c.volume_shape) * c.image_channels / math.prod(latent), 2),
            "autoencoder_channels": list(c.image_autoencoder.channels),
            "psnr_db": r["psnr_db"], "ssim": r["ssim"], "l1": r["l1"], "per_case": r["per_case"],
            "seconds": round(time.perf_counter() - t0, 1),
        }
        k = min(a.cases, len(images))
        recons[name] = reconstruct(pipe.image_autoencoder, images[:k], batch_size=4).clamp(0, 1)
        real_cases = (images[:k], names[:k])
        print(f"{name}: PSNR {r['psnr_db']['mean']:.2f} dB, SSIM {r['ssim']['mean']:.3f}, L1 {r['l1']['mean']:.4f} "
              f"(latent {tuple(latent)})")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"subset": a.subset, "split": Path(a.split).name, "num_cases": len(real_cases[1]) if real_cases else 0,
            "threads": torch.get_num_threads(), "machine": platform.machine()}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "models": results}, indent=2) + "\n")
    montage(real_cases[0], recons, real_cases[1], out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()

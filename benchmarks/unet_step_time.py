"""Training-step time of image-UNet candidates on this CPU: which extra capacity is cheap?

For each candidate channel / residual-block layout of MONAI's ``DiffusionModelUNet`` (3D, the hippocampus recipe's
latent: 8 channels at 16 x 24 x 16), time forward + backward + AdamW step of a batch on random latents, fp32, with
the given thread count; report parameters and the median of the timed steps (after one warm-up step). Writes
OUT.json and OUT.md.

    python benchmarks/unet_step_time.py --threads 1 --out benchmarks/results/unet_step_time_cpu
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

#: name -> (channels, num_res_blocks, attention_levels); the first is the bundled model's image UNet.
CANDIDATES = {
    "bundled (16,32,64,64) x1": ((16, 32, 64, 64), (1, 1, 1, 1), (False, False, True, True)),
    "(32,64,64,64) x1": ((32, 64, 64, 64), (1, 1, 1, 1), (False, False, True, True)),
    "(32,32,64,64) x1": ((32, 32, 64, 64), (1, 1, 1, 1), (False, False, True, True)),
    "(16,32,64,128) x1": ((16, 32, 64, 128), (1, 1, 1, 1), (False, False, True, True)),
    "(16,32,64,128) x(1,1,2,2)": ((16, 32, 64, 128), (1, 1, 2, 2), (False, False, True, True)),
    "(16,32,64,128) x2": ((16, 32, 64, 128), (2, 2, 2, 2), (False, False, True, True)),
    "(16,32,128,128) x1": ((16, 32, 128, 128), (1, 1, 1, 1), (False, False, True, True)),
    "(16,64,128,128) x1": ((16, 64, 128, 128), (1, 1, 1, 1), (False, False, True, True)),
}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per candidate (after 1 warm-up)")
    ap.add_argument("--out", required=True, help="output path without suffix")
    args = ap.parse_args()
    from monai.networks.nets import DiffusionModelUNet

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 8, 16, 24, 16, generator=g)
    t = torch.randint(0, 1000, (args.batch_size,), generator=g)
    rows = []
    for name, (channels, blocks, attention) in CANDIDATES.items():
        torch.manual_seed(0)
        net = DiffusionModelUNet(spatial_dims=3, in_channels=8, out_channels=8, channels=channels,
                                 num_res_blocks=blocks, attention_levels=attention, norm_num_groups=16,
                                 num_head_channels=16)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        times = []
        for i in range(args.steps + 1):
            t0 = time.perf_counter()
            net(x, t).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            if i:
                times.append(time.perf_counter() - t0)
        row = {"name": name, "channels": channels, "num_res_blocks": blocks,
               "parameters_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 2),
               "step_s": round(statistics.median(times), 3), "steps_s": [round(v, 3) for v in times]}
        rows.append(row)
        print(f"{name:28s} {row['parameters_m']:6.2f} M  {row['step_s']:.2f} s/step", flush=True)
    base = rows[0]["step_s"]
    for r in rows:
        r["relative_to_bundled"] = round(r["step_s"] / base, 2)
    meta = {"cpu": cpu_name(), "threads": args.threads, "batch_size": args.batch_size, "torch": torch.__version__,
            "latent": [8, 16, 24, 16], "dtype": "float32"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"settings": meta, "rows": rows}, indent=1))
    lines = [f"# Image-UNet training-step time on {meta['cpu']}", "",
             f"{args.threads} thread(s), batch {args.batch_size}, fp32, latent 8 x 16 x 24 x 16, torch "
             f"{torch.__version__}; median of {args.steps} steps after one warm-up (`benchmarks/unet_step_time.py`).",
             "", "| UNet channels x res blocks | parameters (M) | s / step | vs bundled |", "|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['parameters_m']} | {r['step_s']} | {r['relative_to_bundled']}x |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""Soak test: stream 10,000 synthetic pairs and check that resident memory stays flat.

Streams ``SyntheticPairDataset(pipe, num_samples=None)`` (background generation pool) through a
``DataLoader`` the way a training loop consumes it, samples the process RSS every ``--every`` pairs,
and fits a line to RSS after a warm-up. Memory counts as flat when, after the warm-up, RSS grows by
less than ``--max-growth-mb`` over the run (fitted slope x samples) and its peak stays within that
margin of the post-warm-up start.

Usage::

    python benchmarks/soak_stream.py                      # tiny model (16^3), 10,000 pairs, 2 steps
    python benchmarks/soak_stream.py --volume-shape 8 8 8 --steps 1   # the same stream, ~5x cheaper
    python benchmarks/soak_stream.py --model runs/x/model --steps 10 --num-samples 2000

Writes ``benchmarks/results/soak_stream.json`` (+ ``.png`` when matplotlib is installed) and exits 1
when memory is not flat.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

RESULTS = Path(__file__).resolve().parent / "results"


def rss_mb() -> float:
    """Current resident set size of this process in MiB (Linux ``/proc``; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):  # pragma: no cover - not Linux
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder or Hub id (default: duodiff.testing.tiny_pipeline())")
    p.add_argument("--num-samples", type=int, default=10_000)
    p.add_argument("--steps", type=int, default=2, help="denoising steps per stage")
    p.add_argument("--volume-shape", type=int, nargs=3, default=(16, 16, 16),
                   help="volume of the tiny model (ignored with --model)")
    p.add_argument("--batch-size", type=int, default=4, help="DataLoader batch size")
    p.add_argument("--pool-size", type=int, default=16)
    p.add_argument("--generation-batch-size", type=int, default=8)
    p.add_argument("--every", type=int, default=100, help="sample RSS every N pairs")
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of the run ignored for the flatness check")
    p.add_argument("--max-growth-mb", type=float, default=25.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(RESULTS / "soak_stream.json"))
    return p.parse_args(argv)


def summarize(rows: list[tuple[int, float, float]], seeds_seen: set[int], checksum: float,
              args: argparse.Namespace, pipe, *, complete: bool) -> dict:
    """Numbers of the run so far; the flatness fit ignores the first ``args.warmup`` of the planned run."""
    n = np.array([r[0] for r in rows], dtype=float)
    rss = np.array([r[2] for r in rows])
    seen, elapsed = int(n[-1]), rows[-1][1]
    steady = n >= args.warmup * args.num_samples
    slope = fitted_growth = peak_over_start = flat = None
    if steady.sum() >= 2:
        slope = float(np.polyfit(n[steady], rss[steady], 1)[0])
        fitted_growth = slope * (n[steady][-1] - n[steady][0])
        peak_over_start = float(rss[steady].max() - rss[steady][0])
        flat = bool(fitted_growth < args.max_growth_mb and peak_over_start < args.max_growth_mb)
    return {
        "benchmark": "soak_stream",
        "complete": complete,
        "num_samples": seen,
        "unique_seeds": len(seeds_seen),
        "seconds": round(elapsed, 1),
        "pairs_per_second": round(seen / elapsed, 2) if elapsed else None,
        "rss_mb_start": round(float(rss[0]), 1),
        "rss_mb_after_warmup": rnd(rss[steady][0] if steady.any() else None, 1),
        "rss_mb_end": round(float(rss[-1]), 1),
        "rss_mb_peak": round(float(rss.max()), 1),
        "fitted_slope_mb_per_1000_pairs": rnd(None if slope is None else slope * 1000, 3),
        "fitted_growth_mb_after_warmup": rnd(fitted_growth, 2),
        "peak_over_post_warmup_start_mb": rnd(peak_over_start, 2),
        "max_growth_mb": args.max_growth_mb,
        "flat": flat,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "volume_shape": list(pipe.config.volume_shape),
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, python {platform.python_version()}, "
                   f"torch {torch.__version__}",
        "rss_trace": [[int(a), round(b, 2), round(c, 1)] for a, b, c in rows],
        "checksum": checksum,
    }


def rnd(x: float | None, digits: int) -> float | None:
    return None if x is None else round(float(x), digits)


def _write(path: Path, result: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from duodiff import DuoDiffusion
    from duodiff.data import SyntheticPairDataset
    from duodiff.testing import tiny_pipeline

    if args.model is None:
        pipe = tiny_pipeline(volume_shape=tuple(args.volume_shape))
    else:
        pipe = DuoDiffusion.from_pretrained(args.model)
    pipe.to(args.device)
    ds = SyntheticPairDataset(pipe, num_samples=None, num_inference_steps=args.steps, pool_size=args.pool_size,
                              generation_batch_size=args.generation_batch_size, seed=0)
    loader = DataLoader(ds, batch_size=args.batch_size, num_workers=0)

    rows: list[tuple[int, float, float]] = []  # (pairs consumed, seconds, RSS MiB)
    seen, seeds_seen, checksum = 0, set(), 0.0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows.append((0, 0.0, rss_mb()))
    next_mark = args.every
    for batch in loader:
        # what a training step touches: the tensors, their values and metadata
        checksum += float(batch["image"].mean()) + float(batch["label"].float().mean())
        seeds_seen.update(int(s) for s in batch["seed"])
        seen += int(batch["image"].shape[0])
        del batch
        if seen >= next_mark:
            rows.append((seen, time.perf_counter() - start, rss_mb()))
            print(f"{seen:>6d} pairs  {rows[-1][1]:7.1f} s  RSS {rows[-1][2]:8.1f} MiB", flush=True)
            next_mark += args.every
            if seen < args.num_samples:  # keep a partial result on disk in case the run is stopped
                _write(out, summarize(rows, seeds_seen, checksum, args, pipe, complete=False))
        if seen >= args.num_samples:
            break
    result = summarize(rows, seeds_seen, checksum, args, pipe, complete=True)
    _write(out, result)
    n = np.array([r[0] for r in rows], dtype=float)
    rss = np.array([r[2] for r in rows])
    steady = n >= args.warmup * args.num_samples
    slope, intercept = np.polyfit(n[steady], rss[steady], 1)
    flat = result["flat"]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.plot(n, rss, lw=1)
        ax.plot(n[steady], slope * n[steady] + intercept, "--", lw=1, label=f"fit: {slope * 1000:+.2f} MiB / 1000")
        ax.set_xlabel("pairs streamed")
        ax.set_ylabel("RSS (MiB)")
        ax.set_title(f"soak_stream: {result['num_samples']} pairs, {'flat' if flat else 'GROWING'}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=110)
        plt.close(fig)
    except ImportError:  # pragma: no cover
        pass
    print(json.dumps({k: v for k, v in result.items() if k not in ("rss_trace", "settings")}, indent=2))
    return 0 if flat else 1


if __name__ == "__main__":
    sys.exit(main())

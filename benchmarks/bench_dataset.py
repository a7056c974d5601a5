"""Benchmark the streaming SyntheticPairDataset: throughput, training-loop wait time and memory.

Three measurements with the tiny preset (16^3 volumes, randomised weights):

1. **Streaming throughput**: pairs/s a consumer gets from ``SyntheticPairDataset(num_samples=None)`` when it
   does nothing else, next to the raw ``pipe.sample`` rate.
2. **Wait fraction**: a real training loop (MONAI UNet + DiceLoss, ``mix_loaders`` over a real in-memory
   loader, 3 real + 1 synthetic per batch). The share of wall time spent in ``next(batch)`` is the time the
   loop waits for synthetic data (the real side is in memory). Target: <= 5 % when generation is faster
   than training. A second scenario with a trainer faster than generation shows what happens otherwise.
3. **Memory**: RSS every ``--rss-every`` pairs over ``--num-samples`` (default 10,000) streamed pairs;
   flat means no leak (the pool is bounded).

Run:  python benchmarks/bench_dataset.py            (about 5-15 minutes on 2 CPU cores)
      python benchmarks/bench_dataset.py --quick    (a smoke run, < 1 minute)
Writes benchmarks/results/bench_dataset.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from duodiff import SyntheticPairDataset, mix_loaders
from duodiff.testing import phantom_pair, tiny_pipeline

RESULTS = Path(__file__).resolve().parent / "results"


def rss_mb() -> float:
    """Resident set size of this process in MiB (psutil if installed, else /proc/self/status)."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("cannot read RSS: install psutil or run on Linux")


def make_stream(pipe, args, seed=0):
    return SyntheticPairDataset(pipe, num_samples=None, seed=seed, num_inference_steps=args.steps,
                                pool_size=args.pool_size, generation_batch_size=args.generation_batch_size,
                                dtype=args.dtype)


# ------------------------------------------------------------------------------------------ 1. throughput
def in_thread(fn):
    """Run ``fn`` in a separate thread (as the stream's pool does) and return its result."""
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("result", fn()))
    t.start()
    t.join()
    return out["result"]


def bench_throughput(pipe, args) -> dict:
    n, b = args.throughput_samples, args.generation_batch_size

    def raw_loop() -> float:
        pipe.sample(b, seed=10**6, num_inference_steps=args.steps, dtype=args.dtype, progress=False)  # warm-up
        t = time.perf_counter()
        for start in range(0, n, b):
            pipe.sample(b, seed=start, num_inference_steps=args.steps, dtype=args.dtype, progress=False)
        return math.ceil(n / b) * b / (time.perf_counter() - t)

    raw = in_thread(raw_loop)
    it = iter(make_stream(pipe, args))
    next(it)  # thread start + first batch
    t = time.perf_counter()
    for _ in range(n):
        next(it)
    stream = n / (time.perf_counter() - t)
    it.close()
    return {"samples": n, "pipe_sample_pairs_per_s": raw, "stream_pairs_per_s": stream}


# ------------------------------------------------------------------------------------------ 2. wait fraction
def real_loader(shape, num: int = 12, batch_size: int = 3):
    from torch.utils.data import DataLoader, TensorDataset

    images, labels = [], []
    for i in range(num):
        image, label = phantom_pair(shape, num_classes=3, seed=i)
        images.append(image / image.max())
        labels.append(label)
    data = TensorDataset(torch.from_numpy(np.stack(images))[:, None].float(),
                         torch.from_numpy(np.stack(labels))[:, None].long())
    return DataLoader(data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))


def trainer(channels):
    from monai.losses import DiceLoss
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=channels, strides=(2,) * (len(channels) - 1),
               num_res_units=1)
    return net, torch.optim.Adam(net.parameters(), lr=1e-3), DiceLoss(to_onehot_y=True, softmax=True)


def train_step(net, opt, loss_fn, x, y):
    opt.zero_grad()
    loss = loss_fn(net(x), y)
    loss.backward()
    opt.step()


def bench_wait(pipe, args, *, channels, fraction, steps, label) -> dict:
    """A training loop over mix_loaders(real in-memory loader, stream): time in next() vs time training.

    The pool is small (``--wait-pool-size``) so that after the first few steps the loop depends on pairs
    generated while it trains. Generation time is measured inside the pool thread during the same loop.
    """
    net, opt, loss_fn = trainer(channels)
    shape = tuple(pipe.config.volume_shape)
    pool = args.wait_pool_size
    stream = SyntheticPairDataset(pipe, num_samples=None, seed=1000, num_inference_steps=args.steps,
                                  pool_size=pool, generation_batch_size=min(args.generation_batch_size, pool),
                                  dtype=args.dtype)
    generated = {"pairs": 0, "seconds": 0.0}
    original = stream._generate

    def timed_generate(seeds):  # instrumentation: time spent generating in the pool thread
        t = time.perf_counter()
        out = original(seeds)
        generated["seconds"] += time.perf_counter() - t
        generated["pairs"] += len(seeds)
        return out

    stream._generate = timed_generate
    mixed = mix_loaders(real_loader(shape), stream, synthetic_fraction=fraction, keys=("image", "label"))
    waits, trains, n_syn = [], [], []
    start = time.perf_counter()
    while len(trains) < steps:
        it = iter(mixed)
        while len(trains) < steps:
            t0 = time.perf_counter()
            try:
                xb, yb, flag = next(it)
            except StopIteration:
                break
            t1 = time.perf_counter()
            train_step(net, opt, loss_fn, xb, yb)
            waits.append(t1 - t0)
            trains.append(time.perf_counter() - t1)
            n_syn.append(int(flag.sum()))
    total = time.perf_counter() - start
    warm = args.warmup_steps
    train_s = float(np.mean(trains[warm:]))
    demand = float(np.mean(n_syn))
    gen_per_pair = generated["seconds"] / max(generated["pairs"], 1)
    return {
        "scenario": label,
        "trainer_channels": list(channels),
        "synthetic_fraction": fraction,
        "synthetic_per_step": demand,
        "pool_size": pool,
        "train_steps": len(trains),
        "synthetic_consumed": int(sum(n_syn)),
        "train_s_per_step": train_s,
        "generation_s_per_pair_in_loop": gen_per_pair,
        "generation_s_per_step": demand * gen_per_pair,
        "generation_to_training_ratio": demand * gen_per_pair / train_s,
        "wait_fraction_all": float(sum(waits) / total),
        "wait_fraction_steady": float(sum(waits[warm:]) / (sum(waits[warm:]) + sum(trains[warm:]))),
        "first_step_wait_s": float(waits[0]),
    }


# ------------------------------------------------------------------------------------------ 3. memory
def bench_rss(pipe, args) -> dict:
    from tqdm.auto import tqdm

    it = iter(make_stream(pipe, args, seed=5000))
    points = []
    t = time.perf_counter()
    checksum = 0.0
    for i in tqdm(range(1, args.num_samples + 1), desc="streamed pairs", disable=args.no_progress, mininterval=5):
        item = next(it)
        checksum += float(item["image"][0, 0, 0, 0])
        if i % args.rss_every == 0 or i == 1:
            points.append((i, rss_mb()))
    elapsed = time.perf_counter() - t
    it.close()
    n, r = np.array(points, dtype=float).T
    half = n >= n.max() / 2
    slope = float(np.polyfit(n[half], r[half], 1)[0] * 1000) if half.sum() > 1 else 0.0
    after_warm = r[n >= min(n.max(), 1000)]
    return {
        "num_samples": args.num_samples,
        "seconds": elapsed,
        "pairs_per_s": args.num_samples / elapsed,
        "rss_mb": [[int(a), float(b)] for a, b in points],
        "rss_first_mb": float(r[0]),
        "rss_after_1000_mb": float(after_warm[0]),
        "rss_last_mb": float(r[-1]),
        "rss_max_mb": float(r.max()),
        "rss_growth_after_1000_mb": float(r[-1] - after_warm[0]),
        "rss_slope_second_half_mb_per_1000": slope,
    }


# ------------------------------------------------------------------------------------------ report
def write_report(res: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_dataset.json").write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    tp, mem = res["throughput"], res["rss"]
    lines = [
        "# bench_dataset: streaming SyntheticPairDataset",
        "",
        f"`{res['command']}`  ",
        f"{res['env']['cpu']} ({res['env']['cpu_count']} cores, torch {res['env']['torch']}, "
        f"{res['env']['threads']} threads). The machine is shared; 1-min load average per run: "
        + "; ".join(f"{'+'.join(e.get('sections', SECTIONS))}: {e['load_before'][0]} before, {e['load_after'][0]} after"
                    for e in res.get("env_by_run", [res["env"]]))
        + ".  ",
        f"Tiny preset, {'x'.join(map(str, res['settings']['volume_shape']))} volumes, "
        f"{res['settings']['steps']} denoising step(s) per stage, generation batch "
        f"{res['settings']['generation_batch_size']}, pool {res['settings']['pool_size']}, dtype "
        f"{res['settings']['dtype']}.",
        "",
        "## Throughput",
        "",
        "| source | pairs/s |",
        "|---|---|",
        f"| `pipe.sample` in a loop (one thread, no pool) | {tp['pipe_sample_pairs_per_s']:.1f} |",
        f"| streaming dataset, consumer doing nothing | {tp['stream_pairs_per_s']:.1f} |",
        f"| streaming dataset over {mem['num_samples']:,} pairs (RSS run) | {mem['pairs_per_s']:.1f} |",
        "",
        "## Time a training loop waits for synthetic data",
        "",
        "MONAI UNet + DiceLoss on batches from `mix_loaders` (3 in-memory real samples + streamed synthetic ones). "
        "`wait` = share of the loop's time spent in `next(batch)`; generation/step = synthetic pairs per step x "
        "time per pair measured in the pool thread during the same loop (ratio < 1: generation is faster than "
        "training). The pool holds only a few pairs, so the loop depends on pairs made while it trains.",
        "",
        "| scenario | synthetic/step | pool | train step | generation/step | ratio | wait (steady) "
        "| wait (incl. first batch) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for w in res["wait"]:
        lines.append(
            f"| {w['scenario']} (UNet {tuple(w['trainer_channels'])}) | {w['synthetic_per_step']:.0f} "
            f"| {w['pool_size']} | {w['train_s_per_step'] * 1e3:.0f} ms | {w['generation_s_per_step'] * 1e3:.0f} ms "
            f"| {w['generation_to_training_ratio']:.2f} | {w['wait_fraction_steady'] * 100:.1f} % "
            f"| {w['wait_fraction_all'] * 100:.1f} % |"
        )
    lines += [
        "",
        "Target: <= 5 % when generation is faster than training (steady state).",
        "",
        f"## Memory over {mem['num_samples']:,} streamed pairs",
        "",
        f"RSS {mem['rss_first_mb']:.0f} MiB after the first pair, {mem['rss_after_1000_mb']:.0f} MiB after 1,000, "
        f"{mem['rss_last_mb']:.0f} MiB at the end (max {mem['rss_max_mb']:.0f} MiB); growth after 1,000 pairs: "
        f"{mem['rss_growth_after_1000_mb']:+.1f} MiB; slope over the second half: "
        f"{mem['rss_slope_second_half_mb_per_1000']:+.2f} MiB per 1,000 pairs.",
        "",
        "![RSS and wait fraction](bench_dataset.png)",
        "",
    ]
    (out / "bench_dataset.md").write_text("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG", file=sys.stderr)
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    n, r = np.array(mem["rss_mb"]).T
    a.plot(n, r, marker=".")
    a.set_xlabel("pairs streamed")
    a.set_ylabel("RSS (MiB)")
    a.set_ylim(0, max(r) * 1.2)
    a.set_title(f"RSS over {mem['num_samples']:,} streamed pairs")
    names = [w["scenario"].split(":")[0] + f" (ratio {w['generation_to_training_ratio']:.2f})" for w in res["wait"]]
    b.bar(names, [w["wait_fraction_steady"] * 100 for w in res["wait"]])
    b.axhline(5, color="r", linestyle="--", label="5 % target")
    b.set_ylabel("time waiting for synthetic data (%)")
    b.set_title("training-loop wait (steady state); ratio = generation / training")
    b.legend()
    fig.tight_layout()
    fig.savefig(out / "bench_dataset.png", dpi=100)


SECTIONS = ("throughput", "wait", "rss")


def res_command(argv) -> str:
    return "python benchmarks/bench_dataset.py " + " ".join(argv if argv is not None else sys.argv[1:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-samples", type=int, default=10_000, help="pairs streamed for the RSS run")
    p.add_argument("--rss-every", type=int, default=100)
    p.add_argument("--throughput-samples", type=int, default=256)
    p.add_argument("--train-steps", type=int, default=60)
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--steps", type=int, default=1, help="denoising steps per stage")
    p.add_argument("--generation-batch-size", type=int, default=16)
    p.add_argument("--pool-size", type=int, default=32)
    p.add_argument("--dtype", default=None, choices=[None, "bfloat16"], help="autocast dtype for generation")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--volume-shape", type=int, nargs=3, default=(16, 16, 16), help="tiny preset volume (H W D)")
    p.add_argument("--wait-pool-size", type=int, default=8, help="pool of the training-loop scenarios")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                   help="what to run; with a subset, results/bench_dataset.json is updated, not replaced")
    p.add_argument("--quick", action="store_true", help="smoke run: 200 pairs, 8 training steps")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.num_samples, args.throughput_samples, args.train_steps, args.rss_every = 200, 32, 8, 20
    if args.threads:
        torch.set_num_threads(args.threads)
    env = {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_before": [round(x, 2) for x in os.getloadavg()],
    }
    pipe = tiny_pipeline(volume_shape=tuple(args.volume_shape))
    res = {"command": res_command(argv),
           "settings": {"volume_shape": list(args.volume_shape), "steps": args.steps,
                        "generation_batch_size": args.generation_batch_size,
                        "pool_size": args.pool_size, "dtype": args.dtype}}
    previous = args.out / "bench_dataset.json"
    if set(args.sections) != set(SECTIONS) and previous.is_file():  # update some sections of an earlier run
        old = json.loads(previous.read_text())
        res = {**old, **{k: v for k, v in res.items() if k != "command"}}
        res["env_by_run"] = [e for e in old.get("env_by_run", [])
                             if not set(e.get("sections", SECTIONS)) <= set(args.sections)]
        res["command"] = f"{old.get('command', '')}; then {res_command(argv)}"
    if "throughput" in args.sections:
        res["throughput"] = bench_throughput(pipe, args)
        print(f"throughput: pipe.sample {res['throughput']['pipe_sample_pairs_per_s']:.1f} pairs/s, stream "
              f"{res['throughput']['stream_pairs_per_s']:.1f} pairs/s")
    if "wait" in args.sections:
        res["wait"] = [
            bench_wait(pipe, args, channels=(16, 32, 64), fraction=0.25, steps=args.train_steps,
                       label="A: 1 synthetic per step, large trainer"),
            bench_wait(pipe, args, channels=(4, 8), fraction=0.75, steps=max(args.train_steps // 2, 6),
                       label="B: 9 synthetic per step, small trainer"),
        ]
        for w in res["wait"]:
            print(f"wait [{w['scenario']}]: train {w['train_s_per_step'] * 1e3:.0f} ms/step, generation "
                  f"{w['generation_s_per_step'] * 1e3:.0f} ms/step (ratio {w['generation_to_training_ratio']:.2f}), "
                  f"steady wait {w['wait_fraction_steady'] * 100:.1f} %, incl. first batch "
                  f"{w['wait_fraction_all'] * 100:.1f} %")
    if "rss" in args.sections:
        res["rss"] = bench_rss(pipe, args)
        m = res["rss"]
        print(f"rss over {m['num_samples']} pairs ({m['pairs_per_s']:.1f} pairs/s): first {m['rss_first_mb']:.0f} "
              f"MiB, after 1000 {m['rss_after_1000_mb']:.0f} MiB, last {m['rss_last_mb']:.0f} MiB, max "
              f"{m['rss_max_mb']:.0f} MiB, slope {m['rss_slope_second_half_mb_per_1000']:+.2f} MiB/1000")
    env["load_after"] = [round(x, 2) for x in os.getloadavg()]
    env["sections"] = list(args.sections)
    res.setdefault("env_by_run", []).append(env)
    res["env"] = env
    missing = [k for k in SECTIONS if k not in res]
    if missing:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_dataset.json").write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
        print(f"wrote {args.out / 'bench_dataset.json'}; run the sections {missing} too for the .md/.png report")
        return 0
    write_report(res, args.out)
    print(f"wrote {args.out / 'bench_dataset.json'}, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

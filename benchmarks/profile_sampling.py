"""Where does sampling time go? Share of wall time inside the network forwards, and time per op category.

Runs ``pipe.sample(1, ...)`` (the user path: both stages, seeding, scheduler steps, decode) with
timing hooks on the five networks (UNets, ControlNet, decoders) and reports the fraction of wall
time spent inside their forwards (target >= 70 % on CPU). Everything else is the sampling loop's
own overhead: scheduler steps, noise, casts, Python. Then ``torch.profiler`` self time per op category
(convolution, group norm, attention, casts, ...) for every dtype side by side, with each dtype's gain over the
first (where does bf16 gain or lose?), the top ops of the last dtype, and a ``cProfile`` listing of Python
functions, all written to the report. ``--batch-size`` and ``--channels-last`` test the two usual levers.

Examples::

    python benchmarks/profile_sampling.py                          # CPU, results/profile_cpu.txt
    python benchmarks/profile_sampling.py --dtypes float32 bfloat16 --steps 20 --batch-size 4 --channels-last
    python benchmarks/profile_sampling.py --device cuda --out benchmarks/results/profile_cuda.txt
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"

#: op-name substrings -> category of the per-op dtype comparison (first match wins; aten op names).
OP_CATEGORIES = (
    ("convolution", ("conv", "mkldnn_convolution")),
    ("group norm", ("group_norm",)),
    ("attention", ("bmm", "softmax", "scaled_dot_product", "_efficient_attention", "_flash_attention", "baddbmm")),
    ("linear", ("addmm", "aten::mm", "linear")),
    ("dtype casts / copies", ("aten::to", "_to_copy", "copy_", "contiguous", "clone")),
    ("interpolate", ("upsample", "interpolate")),
    ("elementwise", ("add", "mul", "silu", "sigmoid", "div", "sub", "cat", "fill_", "zero_", "exp", "sqrt", "rsqrt")),
)


def without_machine_paths(text: str) -> str:
    """``text`` with this checkout's and the environment's folders cut (no machine paths in committed results)."""
    import sysconfig

    purelib = sysconfig.get_paths()["purelib"]
    return text.replace(purelib + "/", "site-packages/").replace(str(Path(__file__).resolve().parents[1]) + "/", "")


def op_category(name: str) -> str:
    low = name.lower()
    for cat, keys in OP_CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def category_times(prof) -> dict[str, float]:
    """Self CPU seconds per :data:`OP_CATEGORIES` category of a finished ``torch.profiler`` run."""
    out: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        if evt.key.startswith("aten::") or evt.key.startswith("mkldnn"):
            out[op_category(evt.key)] += evt.self_cpu_time_total / 1e6
    return dict(out)


def category_table(per_dtype: dict[str, dict[str, float]]) -> list[str]:
    """Markdown-like text table: seconds per op category and dtype, and each dtype's speed-up over the first."""
    dtypes = list(per_dtype)
    cats = sorted({c for t in per_dtype.values() for c in t}, key=lambda c: -per_dtype[dtypes[0]].get(c, 0.0))
    head = f"{'op category':24s}" + "".join(f"{d:>12s}" for d in dtypes)
    head += "".join(f"{d + ' gain':>16s}" for d in dtypes[1:])
    lines = [head]
    for c in [*cats, "total"]:
        vals = [sum(t.values()) if c == "total" else t.get(c, 0.0) for t in per_dtype.values()]
        row = f"{c:24s}" + "".join(f"{v:12.3f}" for v in vals)
        row += "".join(f"{(vals[0] / v if v else float('inf')):15.2f}x" for v in vals[1:])
        lines.append(row)
    return lines


def network_modules(pipe) -> dict[str, torch.nn.Module]:
    """Top-level modules whose forwards count as 'network time' (no two nested)."""
    return {
        "label_unet": pipe.label_unet,
        "image_unet": pipe.image_unet,
        "image_controlnet": pipe.image_controlnet,
        "label_decoder": pipe.label_autoencoder.decoder,
        "label_post_quant_conv": pipe.label_autoencoder.post_quant_conv,
        "image_decoder": pipe.image_autoencoder.decoder,
        "image_post_quant_conv": pipe.image_autoencoder.post_quant_conv,
    }


class ForwardTimer:
    """Accumulates wall time inside module forwards via pre/post hooks."""

    def __init__(self, modules: dict[str, torch.nn.Module], cuda: bool) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._start: dict[str, float] = {}
        self._handles = []
        self.cuda = cuda
        for name, m in modules.items():
            self._handles.append(m.register_forward_pre_hook(lambda _m, _i, n=name: self._enter(n)))
            self._handles.append(m.register_forward_hook(lambda _m, _i, _o, n=name: self._exit(n)))

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _enter(self, name: str) -> None:
        self._sync()
        self._start[name] = time.perf_counter()

    def _exit(self, name: str) -> None:
        self._sync()
        self.seconds[name] += time.perf_counter() - self._start.pop(name)
        self.calls[name] += 1

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def load(args, device: str):
    from duodiff import DuoDiffusion
    from duodiff.testing import randomize_weights

    model = args.model
    if model is None:
        with contextlib.suppress(FileNotFoundError, ImportError):
            from duodiff.bundled import bundled_model_path

            model = str(bundled_model_path())
    if model and model.lower() != "none":
        from bench_sampling import load_trained  # sibling script

        return load_trained(model, device), f"trained ({model})"
    pipe = randomize_weights(DuoDiffusion.from_preset(args.preset, num_classes=3), std=0.02)
    return pipe.to(device), f"random {args.preset} preset"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="hippocampus", choices=["hippocampus", "paper"],
                   help="architecture when no trained model is used")
    p.add_argument("--model", default=None, help="model folder (default: bundled if installed; 'none' = random)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--scheduler", default="ddim", choices=["ddim", "ddpm", "pndm"])
    p.add_argument("--repeats", type=int, default=3, help="timed sample() calls per dtype (median reported)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's default, all cores); 1 is steadier on a "
                        "machine shared with other jobs")
    p.add_argument("--batch-size", type=int, default=1, help="pairs per sample() call (default 1)")
    p.add_argument("--channels-last", action="store_true",
                   help="convert the networks to channels-last-3D memory format (torch.channels_last_3d) first")
    p.add_argument("--out", default=None, help="report path (default benchmarks/results/profile_<device>.txt)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    out_path = Path(args.out) if args.out else RESULTS / f"profile_{device.type}.txt"
    pipe, weights = load(args, str(device))
    if args.channels_last:
        for m in network_modules(pipe).values():
            m.to(memory_format=torch.channels_last_3d)
    timer = ForwardTimer(network_modules(pipe), cuda)
    lines = [
        f"# duodiff sampling profile: {weights}, volume {pipe.config.volume_shape}, batch {args.batch_size}, "
        f"{'channels-last-3D, ' if args.channels_last else ''}"
        f"{args.scheduler.upper()}-{args.steps}, device {device}",
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads; command: "
        f"{' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}",
        "",
    ]

    def sample(dtype: str):
        return pipe.sample(args.batch_size, seed=0, num_inference_steps=args.steps, scheduler=args.scheduler,
                           dtype=dtype, progress=False)

    summary = []
    for dtype in args.dtypes:
        sample(dtype)  # warm-up: kernel selection, autocast caches
        walls, fracs, per = [], [], defaultdict(list)
        for _ in range(args.repeats):
            timer.reset()
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            sample(dtype)
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
            walls.append(wall)
            fracs.append(sum(timer.seconds.values()) / wall)
            for k, v in timer.seconds.items():
                per[k].append(v)
        i = sorted(range(len(walls)), key=walls.__getitem__)[len(walls) // 2]  # the median run
        wall, frac = walls[i], fracs[i]
        overhead = wall * (1 - frac)
        steps_total = 2 * args.steps
        summary.append((dtype, wall, frac))
        lines += [
            f"## {dtype}: wall {wall:.3f} s (median of {args.repeats}: {', '.join(f'{w:.2f}' for w in walls)})",
            f"fraction of wall time inside network forwards: {frac:.1%} (runs: {', '.join(f'{f:.1%}' for f in fracs)})",
            f"outside the networks: {overhead:.3f} s = {1e3 * overhead / steps_total:.2f} ms per denoising step "
            f"({steps_total} steps over both stages)",
        ]
        for k in network_modules(pipe):
            if per.get(k):
                lines.append(f"  {k:24s} {per[k][i]:8.3f} s  ({per[k][i] / wall:6.1%}), {timer.calls[k]} calls")
        lines.append("")

    # torch.profiler: self time per op category for every dtype, then the top ops of the last dtype
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    per_dtype = {}
    for dtype in args.dtypes:
        with profile(activities=acts) as prof:
            sample(dtype)
        per_dtype[dtype] = category_times(prof)
    lines += ["## torch.profiler: self CPU seconds per op category (one sample() call per dtype; profiler "
              "overhead included)", "", *category_table(per_dtype), ""]
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    lines += [f"## torch.profiler, {args.dtypes[-1]}: top 25 ops by self time", "",
              prof.key_averages().table(sort_by=sort, row_limit=25), ""]

    # cProfile: Python-level view (last dtype)
    pr = cProfile.Profile()
    pr.enable()
    sample(args.dtypes[-1])
    pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(25)
    lines += [f"## cProfile, {args.dtypes[-1]}: top 25 functions by own time", "", buf.getvalue()]
    timer.remove()

    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(without_machine_paths("\n".join(lines) + "\n"))
    for dtype, wall, frac in summary:
        verdict = "met" if frac >= 0.70 else "NOT met"
        print(f"PROFILE {dtype}: {wall:.2f} s per sample() call of {args.batch_size} pair(s), {frac:.1%} of wall "
              "time in network forwards "
              f"(target >= 70 %: {verdict})")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Effect of ``DuoDiffusion.compile()`` (torch.compile of the denoising networks) on sampling latency.

Times ``pipe.sample`` on the bundled model (or ``--model``) without and with compilation, alternating the two
so machine noise hits both alike, and reports the first (compiling) call separately. Writes
``benchmarks/results/bench_compile_<device>.{json,md}``.

    python benchmarks/bench_compile.py --threads 1 --dtype bfloat16 --steps 50 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16", help="autocast dtype ('float32' for none)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mode", default=None, help="torch.compile mode (default: torch's)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import duodiff

    def load():
        pipe = duodiff.load_bundled() if args.model is None else duodiff.DuoDiffusion.from_pretrained(args.model)
        return pipe.to(args.device)

    dtype = None if args.dtype == "float32" else args.dtype
    eager, compiled = load(), load()
    kwargs = {} if args.mode is None else {"mode": args.mode}
    compiled.compile(**kwargs)

    def run(pipe) -> float:
        if pipe.device.type == "cuda":
            torch.cuda.synchronize(pipe.device)
        t0 = time.perf_counter()
        pipe.sample(args.batch_size, seed=0, num_inference_steps=args.steps, dtype=dtype, progress=False)
        if pipe.device.type == "cuda":
            torch.cuda.synchronize(pipe.device)
        return time.perf_counter() - t0

    first_eager = run(eager)
    first_compiled = run(compiled)  # includes compilation
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(args.repeats):
        times["eager"].append(run(eager))
        times["compiled"].append(run(compiled))
    best = {k: min(v) for k, v in times.items()}
    a = eager.sample(1, seed=5, num_inference_steps=args.steps, dtype=dtype, progress=False)
    b = compiled.sample(1, seed=5, num_inference_steps=args.steps, dtype=dtype, progress=False)
    result = {
        "environment": {"torch": torch.__version__, "device": args.device, "threads": torch.get_num_threads(),
                        "cpu": platform.processor() or platform.machine(),
                        "load_average": list(__import__("os").getloadavg())},
        "settings": vars(args),
        "first_call_s": {"eager": first_eager, "compiled_incl_compilation": first_compiled},
        "latency_s": times,
        "best_s": best,
        "speedup": best["eager"] / best["compiled"],
        "max_abs_image_diff": float((a.images - b.images).abs().max()),
        "label_agreement": float((a.labels == b.labels).float().mean()),
    }
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"bench_compile_{args.device.split(':')[0]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    md = [
        f"# torch.compile effect ({args.device}, {args.dtype}, DDIM-{args.steps}, batch {args.batch_size})",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); load average at the end "
        f"{result['environment']['load_average']}. Command: `python benchmarks/bench_compile.py "
        f"--threads {args.threads} --dtype {args.dtype} --steps {args.steps} --repeats {args.repeats}`.",
        "",
        "| | eager | compiled |",
        "|---|---:|---:|",
        f"| first call (s) | {first_eager:.2f} | {first_compiled:.2f} (incl. compilation) |",
        f"| best of {args.repeats} (s) | {best['eager']:.2f} | {best['compiled']:.2f} |",
        "",
        f"Speed-up: **{result['speedup']:.2f}x**. Same seed, eager vs compiled: max |image difference| "
        f"{result['max_abs_image_diff']:.2e}, label agreement {result['label_agreement']:.4f}.",
    ]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()

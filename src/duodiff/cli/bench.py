"""``duodiff bench``: run ``benchmarks/bench_sampling.py`` (sampling speed/memory vs MONAI's inferers).

Every argument after ``bench`` goes to the benchmark script unchanged, e.g.
``duodiff bench --device cuda --preset paper --batch-sizes 1 4 8 --dtypes float16``;
``duodiff bench -h`` shows the script's options, ``--threads N`` among them (checked here first).
"""

from __future__ import annotations

import argparse
from pathlib import Path

SCRIPT = Path("benchmarks") / "bench_sampling.py"


def add_parser(sub) -> None:
    # prefix_chars="+": options such as --device belong to the benchmark script, not to this parser
    p = sub.add_parser("bench", help="benchmark sampling speed and memory (benchmarks/bench_sampling.py)",
                       description=__doc__.split("\n\n")[0], prefix_chars="+", add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for benchmarks/bench_sampling.py")
    p.set_defaults(func=run)


def script_path() -> Path:
    """``benchmarks/bench_sampling.py`` of the source checkout this package runs from."""
    import duodiff

    path = Path(duodiff.__file__).resolve().parents[2] / SCRIPT
    if not path.is_file():
        raise FileNotFoundError(
            f"{SCRIPT} not found next to this duodiff installation ({str(path)!r}). `duodiff bench` runs the "
            "benchmark of a source checkout: clone the duodiff repository and `pip install -e .` it."
        )
    return path


def check_threads_option(argv: list[str]) -> None:
    """Refuse ``--threads N`` / ``--threads=N`` with ``N`` not a positive integer (one line, exit code 2), before
    the benchmark script is loaded."""
    for i, arg in enumerate(argv):
        if arg == "--threads" or arg.startswith("--threads="):
            value = arg.partition("=")[2] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"--threads must be a positive integer (torch intra-op CPU threads), got "
                                 f"{value!r}; e.g. --threads 1.")


def run(args: argparse.Namespace) -> int:
    import importlib.util

    path = script_path()
    spec = importlib.util.spec_from_file_location("duodiff_bench_sampling", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    rest = list(args.bench_args)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    check_threads_option(rest)
    return int(module.main(rest, prog="duodiff bench") or 0)

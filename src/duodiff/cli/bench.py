"""``duodiff bench``: run ``benchmarks/bench_sampling.py`` (sampling speed/memory vs MONAI's inferers).

Every argument after ``bench`` goes to the benchmark script unchanged, e.g.
``duodiff bench --device cuda --preset paper --batch-sizes 1 4 8 --dtypes float16``;
``duodiff bench -h`` shows the script's options, ``--threads N`` among them (checked here first).

The script, its baselines and its results folder belong to a source checkout of duodiff (an editable install,
``pip install -e .``); they are not part of the installed package. Installed from a wheel, ``duodiff bench -h``
says so and ``duodiff bench`` stops with a one-line :class:`SourceCheckoutError`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

SCRIPT = Path("benchmarks") / "bench_sampling.py"

#: What ``duodiff bench -h`` prints when the package runs without a source checkout.
HELP_WITHOUT_CHECKOUT = """usage: duodiff bench [-h] [--threads N] [BENCHMARK OPTIONS ...]

Benchmark sampling speed and memory: runs benchmarks/bench_sampling.py of a source checkout of duodiff, passing
every argument on unchanged (--threads N: torch intra-op CPU threads, checked first).

The benchmark and its options are not available in this installation, which has no source checkout
(no {script} under {root}). Clone the duodiff repository and `pip install -e .` it, then run
`duodiff bench -h` (or `python benchmarks/bench_sampling.py -h`) there.
"""


class SourceCheckoutError(FileNotFoundError):
    """``duodiff bench`` needs ``benchmarks/bench_sampling.py`` of a source checkout, which this installation lacks."""


def add_parser(sub) -> None:
    # prefix_chars="+": options such as --device belong to the benchmark script, not to this parser
    p = sub.add_parser("bench", help="benchmark sampling speed and memory (benchmarks/bench_sampling.py of a "
                                     "source checkout)",
                       description=__doc__.split("\n\n")[0], prefix_chars="+", add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for benchmarks/bench_sampling.py")
    p.set_defaults(func=run)


def _checkout_root() -> Path:
    """The folder two levels above the ``duodiff`` package: a source checkout's root for ``src/duodiff``."""
    import duodiff

    return Path(duodiff.__file__).resolve().parents[2]


def script_path() -> Path:
    """``benchmarks/bench_sampling.py`` of the source checkout this package runs from.

    Raises:
        SourceCheckoutError: the package is not installed from a source checkout (e.g. from a wheel).
    """
    path = _checkout_root() / SCRIPT
    if not path.is_file():
        raise SourceCheckoutError(
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

    rest = list(args.bench_args)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    check_threads_option(rest)
    try:
        path = script_path()
    except SourceCheckoutError:
        if "-h" in rest or "--help" in rest:
            print(HELP_WITHOUT_CHECKOUT.format(script=SCRIPT, root=repr(str(_checkout_root()))), end="")
            return 0
        raise
    spec = importlib.util.spec_from_file_location("duodiff_bench_sampling", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return int(module.main(rest, prog="duodiff bench") or 0)

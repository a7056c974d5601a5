"""OpenMP oversubscription on a shared CPU: how much slower torch gets when another CPU-bound process runs.

Each (threads, wait setting) runs in its own Python process (OpenMP reads its environment when torch loads) that
times a small UNet-like block (4 x Conv3d + GroupNorm + SiLU, batch 1, 32 channels, an 8x12x8 latent: the op mix
and size of duodiff's label denoising steps) in short windows on request; the configurations take turns for
``--rounds`` rounds, so a drifting background load hits them alike, and each reports the median over rounds of
its windows' median seconds per iteration. A competing CPU-bound process is a pure-Python busy loop
(``while True: pass``, one core), started before the timing and killed after it.

Configurations: 1 or 2 intra-op threads, with 0 or 1 competitor, and with the OpenMP wait-policy settings
that stop idle threads from spinning (``OMP_WAIT_POLICY=PASSIVE``, ``GOMP_SPINCOUNT=0`` for GNU libgomp,
``KMP_BLOCKTIME=0`` for Intel/LLVM OpenMP; which runtime torch uses is recorded).

Examples::

    python benchmarks/oversubscription.py                      # ~3 min; results/oversubscription_cpu.json/.md
    python benchmarks/oversubscription.py --rounds 9 --seconds 2 --out /tmp/oversub
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"

#: Environment settings that make idle OpenMP threads sleep instead of spinning.
WAIT_SETTINGS: dict[str, dict[str, str]] = {
    "default": {},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "GOMP_SPINCOUNT=0": {"GOMP_SPINCOUNT": "0"},
    "KMP_BLOCKTIME=0": {"KMP_BLOCKTIME": "0"},
}

#: (threads, competitors, wait setting) in the order they run.
CONFIGS: list[tuple[int, int, str]] = [
    (1, 0, "default"), (2, 0, "default"), (2, 0, "OMP_WAIT_POLICY=PASSIVE"),
    (1, 1, "default"), (2, 1, "default"), (2, 1, "OMP_WAIT_POLICY=PASSIVE"), (2, 1, "GOMP_SPINCOUNT=0"),
    (2, 1, "KMP_BLOCKTIME=0"),
]

CHILD = r"""
import json, statistics, sys, time
import torch
threads = int(sys.argv[1])
torch.set_num_threads(threads)
torch.manual_seed(0)
block = torch.nn.Sequential(*[m for _ in range(4) for m in (
    torch.nn.Conv3d(32, 32, 3, padding=1), torch.nn.GroupNorm(8, 32), torch.nn.SiLU())]).eval()
x = torch.randn(1, 32, 8, 12, 8)
with torch.inference_mode():
    for _ in range(3):
        block(x)
    print("ready", flush=True)
    for line in sys.stdin:  # one timing window per line: the window's length in seconds
        seconds, times = float(line), []
        start = time.perf_counter()
        while time.perf_counter() - start < seconds or len(times) < 3:
            t = time.perf_counter()
            block(x)
            times.append(time.perf_counter() - t)
        print(json.dumps({"median_s": statistics.median(times), "iterations": len(times)}), flush=True)
"""


class Worker:
    """A process that imported torch with one configuration's environment and times the block on request."""

    def __init__(self, threads: int, wait: str) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
        env.update(WAIT_SETTINGS[wait], OMP_NUM_THREADS=str(threads))
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, str(threads)], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def wait_ready(self) -> None:
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if line.strip() != "ready":
            raise RuntimeError(f"benchmark worker failed to start (exit code {self.proc.poll()})")

    def time_window(self, seconds: float) -> dict[str, Any]:
        self.proc.stdin.write(f"{seconds}\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return json.loads(self.proc.stdout.readline())  # type: ignore[union-attr]

    def close(self) -> None:
        self.proc.stdin.close()  # type: ignore[union-attr]
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def openmp_runtime() -> str:
    """Which OpenMP library torch's CPU library links (``libgomp`` = GNU, ``libiomp5`` = Intel)."""
    import torch

    lib = Path(torch.__file__).parent / "lib"
    names = sorted(p.name for p in lib.iterdir() if re.match(r"lib[gi]?omp", p.name))
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["ldd", str(lib / "libtorch_cpu.so")], capture_output=True, text=True, timeout=30).stdout
        names = sorted({m.group(0) for m in re.finditer(r"lib[gi]?omp[a-z0-9]*\.so[.0-9]*", out)} | set(names))
    return ", ".join(names) or "unknown"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        m = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        if m:
            return m.group(1).strip()
    return platform.processor() or "unknown"


def autogroup(pid: int | str = "self") -> str:
    """The Linux scheduler autogroup and its nice value of a process (its CPU share against other sessions)."""
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/autogroup").read_text().strip()
    return "autogroup unknown"


def other_load() -> list[str]:
    """CPU-heavy processes other than this benchmark (``ps``), to name the load in the results."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["ps", "-eo", "pid,pcpu,args", "--sort=-pcpu"], capture_output=True, text=True,
                             timeout=30).stdout.splitlines()[1:]
        mine = {os.getpid()}
        rows = []
        for line in out:
            pid, pcpu, args = line.strip().split(None, 2)
            if int(pid) not in mine and float(pcpu) >= 20:
                rows.append(f"{float(pcpu):.0f}% {args[:100]} ({autogroup(pid)})")
        return rows[:5]
    return []


def timed_window(worker: Worker, competitors: int, seconds: float) -> dict[str, Any]:
    """One timing window of ``worker`` while ``competitors`` busy loops run (started here, killed after)."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(competitors)]
    try:
        time.sleep(0.5 if busy else 0.0)
        return worker.time_window(seconds)
    finally:
        for p in busy:  # only the processes started here
            p.kill()
            p.wait()


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [
        "# OpenMP oversubscription on a shared CPU", "",
        f"{env['cpu']} ({env['cpu_count']} cores), torch {env['torch']}, OpenMP runtime: {env['openmp']}; "
        f"{env['date']}. Command: `{env['command']}`.",
        f"Load average at start {env['load_average_start']}; other CPU-heavy processes at start: "
        f"{'; '.join(env['other_load']) or 'none'}; this benchmark: {env.get('own_autogroup', 'autogroup unknown')}.",
        "",
        "Median seconds per iteration of a Conv3d + GroupNorm + SiLU block (x4, 32 channels, 8x12x8, batch 1); "
        "a competitor is one `python -c 'while True: pass'` process. The last column compares with 1 thread "
        "(default settings) under the same number of competitors. Shown: the median over rounds, and each round's "
        "median (the configurations take turns, so a round's numbers share the background load).", "",
        "| threads | competitors | wait setting | ms / iteration | per round | iterations | vs 1 thread, same load |",
        "|---:|---:|---|---:|---|---:|---:|",
    ]
    rows = result["rows"]
    for r in rows:
        one = next((o for o in rows if o["threads"] == 1 and o["competitors"] == r["competitors"]
                    and o["wait_setting"] == "default"), None)
        ratio = f"{r['median_s'] / one['median_s']:.2f}x" if one else "-"
        lines.append(f"| {r['threads']} | {r['competitors']} | {r['wait_setting']} | {1000 * r['median_s']:.1f} | "
                     f"{' / '.join(f'{1000 * v:.1f}' for v in r['round_medians_s'])} | {r['iterations']} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=3.0, help="timing window per configuration (default 3)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved repetitions of all configurations (default 5)")
    p.add_argument("--out", default=str(RESULTS / "oversubscription_cpu"), help="output prefix (.json/.md)")
    args = p.parse_args(argv)
    import torch

    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "cpu": cpu_model(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "openmp": openmp_runtime(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "other_load": other_load(),
        "own_autogroup": autogroup(),
        "load_average_start": [round(v, 2) for v in os.getloadavg()],
    }
    # one worker per (threads, wait setting): torch is imported once per worker, not once per window
    workers = {key: Worker(*key) for key in dict.fromkeys((t, w) for t, _, w in CONFIGS)}
    runs: dict[tuple[int, int, str], list[dict[str, Any]]] = {c: [] for c in CONFIGS}
    try:
        for worker in workers.values():
            worker.wait_ready()
        for rnd in range(args.rounds):  # rounds interleave the configurations, so drifting load hits all alike
            for threads, competitors, wait in CONFIGS:
                r = timed_window(workers[(threads, wait)], competitors, args.seconds)
                runs[(threads, competitors, wait)].append(r)
                print(f"round {rnd + 1}: threads {threads}, competitors {competitors}, {wait:24s}: "
                      f"{1000 * r['median_s']:8.1f} ms/iter ({r['iterations']} iterations)", flush=True)
    finally:
        for worker in workers.values():
            worker.close()
    rows = []
    for (threads, competitors, wait), rs in runs.items():
        medians = sorted(r["median_s"] for r in rs)
        rows.append({"threads": threads, "competitors": competitors, "wait_setting": wait,
                     "median_s": medians[len(medians) // 2], "round_medians_s": [r["median_s"] for r in rs],
                     "iterations": sum(r["iterations"] for r in rs)})
    env["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    result = {"environment": env, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {out}.json/.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

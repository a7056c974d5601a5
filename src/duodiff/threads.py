"""Intra-op thread count of CPU generation: pinned so that results do not depend on where they are made, and
chosen by load so that a busy machine does not slow duodiff down many times over.

Conv3d / GEMM reductions on the CPU are split over ``torch.get_num_threads()`` threads, and the split changes
the floating-point summation order: the same seed gives images that differ in the last bits (seen: 1.9e-6)
between a 2-thread main process and a 1-thread DataLoader worker. Generating with a fixed thread count makes
an item bit-identical in the main process, in forked / spawned / persistent workers and from the cache.

On a shared machine torch's default (one OpenMP thread per core) collapses: OpenMP threads spin while they wait
for a peer that another process has descheduled. Measured on a 2-core Xeon (``benchmarks/oversubscription.py``,
``benchmarks/results/oversubscription_cpu.md``): 2 threads ran a UNet-like block 9.8x slower than 1 thread beside
a 2-thread training job, 7.8x beside one more busy loop; a passive OpenMP wait policy left 1.4x / 2.0x, and
1 thread was fastest in every loaded case. :func:`threads_for_load` picks the count the CLI uses by default.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import torch

__all__ = ["GENERATION_THREADS", "IDLE_MARGIN", "check_num_threads", "intra_op_threads", "available_cores",
           "busy_cores_of_others", "threads_for_load"]

#: Default intra-op threads of dataset generation on the CPU: 1, what PyTorch gives every DataLoader worker.
GENERATION_THREADS = 1


def check_num_threads(num_threads: int | None) -> None:
    """Raise ``ValueError`` unless ``num_threads`` is ``None`` or a positive int."""
    if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, int)
                                    or num_threads < 1):
        raise ValueError(f"num_threads must be a positive int or None, got {num_threads!r}.")


@contextlib.contextmanager
def intra_op_threads(num_threads: int | None, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run the block with ``num_threads`` intra-op threads on the CPU, then restore the previous count.

    ``torch.set_num_threads`` is per calling thread with PyTorch's OpenMP backend, so this does not change the
    thread count of other Python threads (a training loop beside a generation thread). On other devices, or
    with ``num_threads=None``, the block runs unchanged.

    Raises:
        ValueError: ``num_threads`` is not ``None`` or a positive int.
    """
    check_num_threads(num_threads)
    if num_threads is None or torch.device(device).type != "cpu" or torch.get_num_threads() == num_threads:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


#: Cores that other processes may keep busy (background noise of an idle machine) before a core counts as taken.
IDLE_MARGIN = 0.25


def _cpu_times() -> tuple[float, float]:
    """``(busy, total)`` CPU seconds of the whole machine since boot (Linux ``/proc/stat``)."""
    fields = [float(v) for v in open("/proc/stat").readline().split()[1:]]  # noqa: SIM115 - one short read
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(fields[:8]) - idle) / tick, sum(fields[:8]) / tick


def busy_cores_of_others(interval: float = 0.2) -> float | None:
    """How many cores other processes kept busy during the next ``interval`` seconds (this one sleeps meanwhile).

    Reads the machine's CPU times (``/proc/stat``) before and after ``interval`` and subtracts this process's own
    (``os.times``). Returns ``None`` where ``/proc/stat`` does not exist (macOS, Windows).
    """
    try:
        busy0, _ = _cpu_times()
        own0, wall0 = sum(os.times()[:2]), time.monotonic()
        time.sleep(interval)
        busy1, _ = _cpu_times()
        own1, wall1 = sum(os.times()[:2]), time.monotonic()
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, ((busy1 - busy0) - (own1 - own0)) / max(wall1 - wall0, 1e-6))


def threads_for_load(*, interval: float = 0.2, max_threads: int | None = None) -> int:
    """Intra-op threads for a CPU job started now: the cores other processes leave free, at least 1.

    ``floor(available cores - busy_cores_of_others() + IDLE_MARGIN)``, clipped to ``[1, max_threads]``
    (default ``max_threads``: torch's current count). On an idle 2-core machine this is 2; beside any CPU-bound job
    it is 1, where OpenMP threads cannot spin-wait on each other (see the module docstring for the measurements).
    Where the load cannot be read, ``max_threads``.
    """
    limit = torch.get_num_threads() if max_threads is None else max_threads
    check_num_threads(limit)
    others = busy_cores_of_others(interval)
    if others is None:
        return limit
    return max(1, min(limit, int(available_cores() - others + IDLE_MARGIN)))


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS has one, else ``os.cpu_count()``)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

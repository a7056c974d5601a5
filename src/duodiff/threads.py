"""Intra-op thread count of CPU generation, pinned so that results do not depend on where they are made.

Conv3d / GEMM reductions on the CPU are split over ``torch.get_num_threads()`` threads, and the split changes
the floating-point summation order: the same seed gives images that differ in the last bits (seen: 1.9e-6)
between a 2-thread main process and a 1-thread DataLoader worker. Generating with a fixed thread count makes
an item bit-identical in the main process, in forked / spawned / persistent workers and from the cache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["GENERATION_THREADS", "check_num_threads", "intra_op_threads"]

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

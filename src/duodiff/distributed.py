"""Multi-process generation: each rank makes a disjoint share of the seeds into one output folder.

Under ``torchrun --nproc_per_node=K duodiff sample ...`` (or with ``--distributed``) every process
reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``, takes the seeds ``seeds[rank::K]`` and writes its
cases; case names come from seeds, so ranks never write the same file. Resuming is per rank: a
rank shards the full seed list first and then skips its seeds whose label file exists, so every
process agrees on the split without talking. The process group (``gloo`` on CPU, ``nccl`` on
CUDA) is used only for the final barrier, after which rank 0 writes the final ``dataset.json``.

Example:
    >>> from duodiff.distributed import shard_seeds
    >>> shard_seeds(range(10), rank=1, world_size=3)
    [1, 4, 7]
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .io import NIFTI_SUFFIX, write_json

__all__ = ["shard_seeds", "env_world", "is_torchrun", "group_rank", "DistributedContext", "current_context",
           "init_distributed", "finalize_folder"]


def shard_seeds(seeds: Iterable[int], rank: int, world_size: int) -> list[int]:
    """The seeds rank ``rank`` of ``world_size`` generates: every ``world_size``-th, from position ``rank``.

    The shards are disjoint, their union is ``seeds``, and their sizes differ by at most one.
    """
    for name, v in (("rank", rank), ("world_size", world_size)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {v!r}.")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}.")
    return list(seeds)[rank::world_size]


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}.") from None


def env_world() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the variables torchrun sets (``(0, 1, 0)`` without them)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world} are inconsistent; launch with torchrun.")
    return rank, world, local


def group_rank() -> tuple[int, int] | None:
    """``(rank, world_size)`` in the initialised default process group, or ``None`` when there is none.

    The one place duodiff asks ``torch.distributed`` for ranks (training loop, data samplers, process groups).
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return None


def is_torchrun() -> bool:
    """Whether this process was started by torchrun (or another launcher) with more than one process."""
    return env_world()[1] > 1


@dataclass
class DistributedContext:
    """Where this process stands in a multi-process run.

    Attributes:
        rank / world_size / local_rank: as set by the launcher (``0 / 1 / 0`` for a single process).
        owns_group: whether :func:`init_distributed` created the process group (and so closes it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, seeds: Iterable[int]) -> list[int]:
        """This rank's seeds (see :func:`shard_seeds`)."""
        return shard_seeds(seeds, self.rank, self.world_size)

    def device(self, requested: str) -> str:
        """``"cuda"`` becomes ``"cuda:<local_rank>"`` so each process gets its own GPU; others are kept."""
        if self.is_distributed and requested == "cuda":
            return f"cuda:{self.local_rank}"
        return requested

    def barrier(self) -> None:
        """Wait for every rank (no-op for a single process)."""
        if self.is_distributed and dist.is_initialized():
            dist.barrier()

    def close(self) -> None:
        """Destroy the process group if this context created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def current_context() -> DistributedContext:
    """Where this process stands in the current process group (joins none; one process when there is none)."""
    found = group_rank()
    if found is None:
        return DistributedContext()
    return DistributedContext(*found, local_rank=_env_int("LOCAL_RANK", found[0]), owns_group=False)


def init_distributed(device: str = "cpu") -> DistributedContext:
    """Join the launcher's process group (``gloo`` for CPU, ``nccl`` for CUDA) if there is one.

    Reuses an existing default group; a single process (no ``WORLD_SIZE > 1``) gets a context
    with ``world_size=1`` and no group.
    """
    found = group_rank()
    if found is not None:
        return DistributedContext(*found, env_world()[2], owns_group=False)
    rank, world, local = env_world()
    if world == 1:
        return DistributedContext(0, 1, 0, owns_group=False)
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build; run a single process.")
    use_nccl = str(device).startswith("cuda") and torch.cuda.is_available() and dist.is_nccl_available()
    if use_nccl:
        torch.cuda.set_device(local)
    dist.init_process_group(backend="nccl" if use_nccl else "gloo")
    return DistributedContext(rank, world, local, owns_group=True)


def finalize_folder(out_dir: str | os.PathLike) -> int:
    """Set ``numTraining`` in ``out_dir/dataset.json`` to the number of label files (call on rank 0
    after the barrier: ranks rewrite ``dataset.json`` concurrently, and the last writer may have
    counted before the others finished). Returns that number."""
    out = Path(out_dir)
    num = len(list((out / "labelsTr").glob(f"*{NIFTI_SUFFIX}")))
    path = out / "dataset.json"
    if path.is_file():
        meta = json.loads(path.read_text())
        if meta.get("numTraining") != num:
            meta["numTraining"] = num
            write_json(path, meta)
    return num

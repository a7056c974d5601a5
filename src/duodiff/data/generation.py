"""What every model-backed synthetic dataset shares: validated generation settings and the call that makes pairs.

:class:`PairGenerator` is held (composition) by :class:`~duodiff.SyntheticPairDataset` (map-style) and
:class:`~duodiff.data.StreamingSyntheticPairDataset`; they differ only in which seeds they ask for and when.
Items are MONAI-style dicts ``{"image": MetaTensor (C, H, W, D) float32 in [0, 1], "label": MetaTensor
(1, H, W, D) int64, "is_synthetic": True, "seed": int}``; the MetaTensors carry the affine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from .. import keys
from ..fingerprint import model_fingerprint
from ..schedulers import DEFAULT_NUM_INFERENCE_STEPS, DEFAULT_SCHEDULER
from ..threads import GENERATION_THREADS, check_num_threads, intra_op_threads

if TYPE_CHECKING:  # pragma: no cover
    from ..pipeline import DuoDiffusion

__all__ = ["PairGenerator", "GeneratorBacked", "SAMPLE_KWARGS", "as_item", "check_index", "check_device_usable",
           "check_seed", "check_transform", "model_fingerprint"]

#: The ``DuoDiffusion.sample`` options a dataset may pass to every generation call (``sample_kwargs``).
SAMPLE_KWARGS = ("class_volumes", "guidance_scale", "volume_tolerance", "qc", "qc_threshold", "max_retries",
                 "decode_tile_size")


def check_device_usable(pipe: DuoDiffusion) -> None:
    """Fail clearly (instead of a cryptic CUDA error) when generating on CUDA in a forked worker."""
    device = pipe.device
    if device.type == "cuda" and torch.cuda._is_in_bad_fork():
        info = get_worker_info()
        where = f"DataLoader worker {info.id}" if info is not None else "a forked process"
        raise RuntimeError(
            f"SyntheticPairDataset cannot generate on {device} inside {where}: CUDA cannot be used in a process "
            "forked after CUDA was initialised. Supported setups: (1) stream in the main process, "
            "SyntheticPairDataset(pipe, num_samples=None) with DataLoader(num_workers=0) — its background pool "
            "already overlaps generation with training; (2) DataLoader(..., num_workers=k, "
            "multiprocessing_context='spawn'); (3) generate on CPU in workers (pipe.to('cpu')); or (4) write "
            "pairs with `duodiff sample` and read them with SyntheticPairDataset.from_folder()."
        )


def as_item(image: torch.Tensor, label: torch.Tensor, affine: np.ndarray | torch.Tensor, seed: int) -> dict[str, Any]:
    """A synthetic item dict: image and label as MetaTensors with (copies of) ``affine``, the flag and the seed."""
    from monai.data import MetaTensor

    aff = torch.as_tensor(np.asarray(affine), dtype=torch.float64)
    return {
        keys.IMAGE: MetaTensor(image, affine=aff.clone()),
        keys.LABEL: MetaTensor(label, affine=aff.clone()),
        keys.IS_SYNTHETIC: True,
        keys.SEED: int(seed),
    }


def check_index(index: Any, length: int) -> int:
    """``index`` as an int in ``[0, length)`` (negative indices count from the end, as in a sequence)."""
    if isinstance(index, bool) or not isinstance(index, (int, np.integer, torch.Tensor)):
        raise TypeError(f"index must be an int, got {type(index).__name__}.")
    i = int(index)
    if i < 0:
        i += length
    if not 0 <= i < length:
        raise IndexError(f"index {int(index)} is out of range for a dataset of {length} pairs.")
    return i


def check_seed(seed: Any) -> int:
    """A dataset's first ``seed`` as an int; ``ValueError`` unless it is an int >= 0 (a bool is no seed)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}.")
    return int(seed)


def check_transform(transform: Any) -> None:
    """A dataset's ``transform`` must be ``None`` or callable (``TypeError`` otherwise)."""
    if transform is not None and not callable(transform):
        raise TypeError(f"transform must be callable (e.g. a monai.transforms.Compose), got {transform!r}.")


class PairGenerator:
    """A model and its generation settings, checked once; :meth:`generate` makes the pairs of given seeds.

    The pair of seed ``s`` equals ``pipe.sample(1, seed=s, ...)`` run with ``num_threads`` intra-op threads, in
    any process (see the ``num_threads`` argument of :class:`~duodiff.SyntheticPairDataset`).

    Args:
        pipe: the model. Generation runs on ``pipe.device``.
        num_inference_steps: denoising steps per stage.
        scheduler: a sampler of :data:`duodiff.schedulers.SAMPLERS`, or ``None`` (default): each stage's own,
            DDIM or ``rflow`` for rectified flow.
        dtype: autocast dtype; ``"auto"`` is resolved here, once, so every worker and the cache agree.
        conditioning_scale: ControlNet residual multiplier.
        sample_kwargs: extra ``DuoDiffusion.sample`` options (:data:`SAMPLE_KWARGS`).
        num_threads: intra-op threads of CPU generation (``None``: the calling thread's count).
    """

    def __init__(
        self,
        pipe: DuoDiffusion,
        *,
        num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
        scheduler: str | None = DEFAULT_SCHEDULER,
        dtype: str | torch.dtype | None = "auto",
        conditioning_scale: float = 1.0,
        sample_kwargs: dict[str, Any] | None = None,
        num_threads: int | None = GENERATION_THREADS,
    ) -> None:
        from ..pipeline import DuoDiffusion
        from ..precision import choose_dtype, is_auto
        from ..schedulers import check_num_inference_steps, check_scheduler_name

        if not isinstance(pipe, DuoDiffusion):
            raise TypeError(
                f"pipe must be a DuoDiffusion model, got {type(pipe).__name__}. Load one with "
                "DuoDiffusion.from_pretrained(...), or read saved pairs with SyntheticPairDataset.from_folder(dir)."
            )
        for kind in ("label", "image"):
            check_num_inference_steps(num_inference_steps, pipe.config.schedule_of(kind))
        scheduler = check_scheduler_name(scheduler)  # lower case; None = each stage's own (DDIM or rflow)
        check_num_threads(num_threads)
        unknown = sorted(set(sample_kwargs or {}) - set(SAMPLE_KWARGS))
        if unknown:
            raise ValueError(f"sample_kwargs has unknown option(s) {unknown}; allowed: {sorted(SAMPLE_KWARGS)}.")
        self.sample_kwargs = dict(sample_kwargs or {})
        volumes = self.sample_kwargs.get("class_volumes")
        if volumes is not None:  # refuse impossible volumes here, not later inside a DataLoader worker
            pipe.check_class_volumes(volumes, len(volumes) if isinstance(volumes, (list, tuple)) else 1)
        if is_auto(dtype):  # once, here: workers and the cache fingerprint must all see the same dtype
            with intra_op_threads(num_threads, pipe.device):
                dtype = str(choose_dtype(pipe, num_inference_steps)).removeprefix("torch.")
        self.pipe = pipe
        self.dtype = dtype
        self.num_threads = num_threads
        #: the settings that decide the pairs (part of the cache fingerprint)
        self.generation: dict[str, Any] = {
            "num_inference_steps": int(num_inference_steps),
            "scheduler": scheduler,
            "dtype": None if dtype is None else str(dtype),
            "conditioning_scale": float(conditioning_scale),
        }
        if self.sample_kwargs:  # a qc module by its class and threshold
            self.generation["sample_kwargs"] = repr(sorted(
                (k, type(v).__name__ if k == "qc" else v) for k, v in self.sample_kwargs.items()
            ))

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.generation.items())
        return (f"PairGenerator(volume_shape={tuple(self.pipe.config.volume_shape)}, device={self.pipe.device}, "
                f"{settings})")

    def fingerprint(self) -> str:
        """The cache key of these pairs: model config and weights and the generation settings."""
        return model_fingerprint(self.pipe, self.generation)

    def generate(self, seeds: Sequence[int]) -> list[dict[str, Any]]:
        """The item dicts of ``seeds``, made in one ``pipe.sample`` call (no transform applied)."""
        check_device_usable(self.pipe)
        g = self.generation
        with intra_op_threads(self.num_threads, self.pipe.device):
            out = self.pipe.sample(len(seeds), seed=list(seeds), num_inference_steps=g["num_inference_steps"],
                                   scheduler=g["scheduler"], dtype=self.dtype,
                                   conditioning_scale=g["conditioning_scale"], progress=False,
                                   **self.sample_kwargs)
        return [as_item(out.images[i], out.labels[i], out.affine, s) for i, s in enumerate(out.seeds)]


class GeneratorBacked:
    """What the model-backed datasets share through their :class:`PairGenerator` (``self.generator``)."""

    generator: PairGenerator

    @property
    def pipe(self) -> DuoDiffusion:
        return self.generator.pipe

    @property
    def generation(self) -> dict[str, Any]:
        """The settings that decide the pairs (steps, scheduler, resolved dtype, conditioning scale, ...)."""
        return self.generator.generation

    def _describe(self) -> str:
        """``volume_shape=..., device=..., <generation settings>`` for ``__repr__``."""
        settings = ", ".join(f"{k}={v!r}" for k, v in self.generation.items())
        return f"volume_shape={tuple(self.pipe.config.volume_shape)}, device={self.pipe.device}, {settings}"

    def _generate(self, seeds: list[int]) -> list[dict[str, Any]]:
        """The items of ``seeds`` (one generation call, no transform); tests replace it to count calls."""
        return self.generator.generate(seeds)

"""The options of one sampling call, checked once: :class:`SamplingOptions`.

:meth:`~duodiff.DuoDiffusion.sample`, :meth:`~duodiff.DuoDiffusion.sample_labels` and
:meth:`~duodiff.DuoDiffusion.generate_images` take the same keyword arguments; each builds one
:class:`SamplingOptions` from them, so an option means the same thing, and is refused with the same message, in
all three. What can be checked without the model is checked here, at construction; what needs the model
(``num_inference_steps`` against the training schedule, ``class_volumes`` against the label names and field of
view, ``dtype`` against the weights: :func:`sampling_autocast`) is checked by the pipeline, still before anything
is generated. :class:`SamplingPlan` is the options resolved against a model; :func:`check_label_maps` checks the
label maps given to ``generate_images``.
"""

from __future__ import annotations

import functools
import math
import numbers
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .attributes import attribute_context, attribute_names
from .decoding import TileSize, check_tile_size
from .dtypes import resolve_dtype
from .precision import choose_dtype, is_auto
from .sampling import is_stochastic
from .schedulers import (
    DEFAULT_NUM_INFERENCE_STEPS,
    DEFAULT_SCHEDULER,
    Sampler,
    check_num_inference_steps,
    check_scheduler_name,
    make_scheduler,
)

if TYPE_CHECKING:  # pragma: no cover
    from .pipeline import DuoDiffusion

__all__ = ["SamplingOptions", "SamplingPlan", "ClassVolumes", "check_label_maps", "sampling_autocast", "make_plan",
           "stage_scheduler"]

#: A ``class_volumes`` request: ``{class name or id: mL}`` for all samples, or one mapping per sample.
ClassVolumes = Mapping[str | int, float] | Sequence[Mapping[str | int, float]]


def _is_int(value: Any, *, numpy: bool = False) -> bool:
    return isinstance(value, (int, np.integer) if numpy else int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingOptions:
    """The validated, immutable options of one sampling call; see :meth:`duodiff.DuoDiffusion.sample`.

    Every field has the meaning and default of the keyword argument of the same name. Construction raises
    ``TypeError`` / ``ValueError`` naming the bad value and the fix; seeds are resolved last, once every option
    passed (so a ``generator`` is only drawn from for a valid call).

    Attributes:
        num_samples: how many samples (for ``generate_images``: the number of label maps), ``>= 1``.
        seeds: ``(num_samples,)`` non-negative per-sample seeds resolved from ``seed`` / ``generator`` (not an
            argument).

    Example:
        >>> from duodiff.sampling_options import SamplingOptions
        >>> SamplingOptions(2, seed=5, num_inference_steps=2).seeds
        (5, 6)
        >>> SamplingOptions(1, guidance_scale=-1.0)
        Traceback (most recent call last):
        ...
        ValueError: guidance_scale must be a number >= 0, got -1.0.
    """

    num_samples: int
    seed: int | Sequence[int] | None = None
    generator: torch.Generator | None = None
    batch_size: int | None = None
    num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS
    scheduler: str | None = DEFAULT_SCHEDULER
    conditioning_scale: float = 1.0
    dtype: str | torch.dtype | None = "auto"
    decode_tile_size: TileSize = "auto"
    class_volumes: ClassVolumes | None = None
    guidance_scale: float = 1.0
    volume_tolerance: float | None = None
    qc: nn.Module | None = None
    qc_threshold: float = 0.5
    max_retries: int = 3
    progress: bool = True
    seeds: tuple[int, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        n = self.num_samples
        if not _is_int(n) or n < 1:
            raise ValueError(f"num_samples must be a positive int, got {n!r}.")
        self._check_seed()
        if self.batch_size is not None and (not _is_int(self.batch_size) or self.batch_size < 1):
            raise ValueError(f"batch_size must be a positive int or None, got {self.batch_size!r}.")
        if not _is_int(self.num_inference_steps):  # the range needs the model's schedule: SamplingPlan
            raise TypeError(f"num_inference_steps must be an int, got {self.num_inference_steps!r}.")
        check_scheduler_name(self.scheduler)
        if not _is_number(self.conditioning_scale):
            raise TypeError(f"conditioning_scale must be a number, got {self.conditioning_scale!r}.")
        if not is_auto(self.dtype):
            resolve_dtype(self.dtype)
        check_tile_size(self.decode_tile_size)
        if not _is_number(self.guidance_scale) or self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a number >= 0, got {self.guidance_scale!r}.")
        self._check_constraints()
        object.__setattr__(self, "seeds", tuple(self._resolve_seeds()))

    def _check_seed(self) -> None:
        seed, n = self.seed, self.num_samples
        if seed is not None and self.generator is not None:
            raise ValueError("Pass either seed or generator, not both.")
        if isinstance(seed, (list, tuple)):
            if len(seed) != n:
                raise ValueError(f"Got {len(seed)} seeds for {n} samples; pass one seed per sample or a single int.")
            values = [int(s) for s in seed]
        elif seed is not None:
            if not _is_int(seed, numpy=True):
                raise TypeError(f"seed must be an int or a list of ints, got {seed!r}.")
            values = [int(seed)]
        else:
            return
        if min(values) < 0:
            raise ValueError(f"seeds must be >= 0, got {min(values)}.")

    def _check_constraints(self) -> None:
        """The rejection-sampling and QC options (used by ``sample`` only)."""
        tol = self.volume_tolerance
        if tol is not None and (self.class_volumes is None or not tol > 0):
            raise ValueError(f"volume_tolerance needs class_volumes and a value > 0, got {tol!r}.")
        if not _is_int(self.max_retries) or self.max_retries < 0:
            raise ValueError(f"max_retries must be an int >= 0, got {self.max_retries!r}.")
        if self.qc is not None and not callable(self.qc):
            raise TypeError(f"qc must be a torch module (a segmenter), got {type(self.qc).__name__}.")
        t = self.qc_threshold
        if self.qc is None:
            return
        if not isinstance(t, numbers.Real) or isinstance(t, bool):
            raise TypeError(f"qc_threshold must be a Dice value in [0, 1], got {t!r}.")
        if not 0 <= t <= 1 or math.isnan(t):
            raise ValueError(f"qc_threshold must be a Dice value in [0, 1], got {t}.")

    def _resolve_seeds(self) -> list[int]:
        n = self.num_samples
        if isinstance(self.seed, (list, tuple)):
            return [int(s) for s in self.seed]
        if self.seed is not None:
            return [int(self.seed) + i for i in range(n)]
        if self.generator is not None:
            return torch.randint(0, 2**62, (n,), generator=self.generator).tolist()
        base = secrets.randbits(62)
        return [base + i for i in range(n)]

    @property
    def stochastic(self) -> bool:
        """Whether :attr:`scheduler` draws noise at each step (DDPM)."""
        return is_stochastic(self.scheduler)

    @property
    def constrained(self) -> bool:
        """Whether samples are checked (``volume_tolerance`` or ``qc``) and possibly regenerated."""
        return self.volume_tolerance is not None or self.qc is not None

    @property
    def batch(self) -> int:
        """Samples per forward pass: :attr:`batch_size`, or all of them."""
        return self.num_samples if self.batch_size is None else int(self.batch_size)


@dataclass(frozen=True)
class SamplingPlan:
    """:class:`SamplingOptions` resolved against one model (made by the pipeline, after its own checks).

    Attributes:
        options: the call's options.
        new_scheduler: ``new_scheduler(kind)``, a fresh sampler for the ``"label"`` or ``"image"`` stage with its
            timesteps set; multistep samplers keep the previous steps' outputs, so every denoising run (each
            stage, batch and retry) gets its own.
        amp: the autocast dtype (``None``: float32).
        requested_volumes: float32 ``(N, K-1)`` requested foreground volumes as ``log1p(voxels)`` (the
            ``"volume"`` attribute columns; empty ``(N, 0)`` without volume conditioning); ``volume_mask``
            ``(N, K-1)`` is 1 where a volume was requested.
        context, null_context: float32 ``(N, 1, E)`` cross-attention contexts of the label UNet, or ``None`` for a
            model without attribute conditioning.
    """

    options: SamplingOptions
    new_scheduler: Callable[[str], Sampler]
    amp: torch.dtype | None
    requested_volumes: torch.Tensor
    volume_mask: torch.Tensor
    context: torch.Tensor | None = None
    null_context: torch.Tensor | None = None

    def contexts(self, idx: Sequence[int] | slice) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(context, null_context)`` rows of the samples ``idx`` (``None`` without attribute conditioning)."""
        if self.context is None or self.null_context is None:
            return None, None
        return self.context[idx], self.null_context[idx]


def check_label_maps(labels: torch.Tensor | np.ndarray, volume_shape: Sequence[int],
                     label_names: Sequence[str]) -> torch.Tensor:
    """Check user label maps (the input of ``generate_images``) and return them as int64 ``(N, 1, H, W, D)``.

    Args:
        labels: integer ``(N, 1, H, W, D)`` or ``(N, H, W, D)`` tensor or array of class ids.
        volume_shape: the model's ``(H, W, D)``.
        label_names: the model's class names, background first (``K = len(label_names)`` classes).

    Returns:
        int64 ``(N, 1, H, W, D)`` on the device of ``labels`` (CPU for an array).

    Raises:
        TypeError: not a tensor or array, or not an integer dtype.
        ValueError: another shape, no map (``N = 0``) or an id outside ``range(K)``.
    """
    if isinstance(labels, np.ndarray):
        labels = torch.from_numpy(labels)
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor or numpy array, got {type(labels).__name__}.")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(
            f"labels must have an integer dtype (class ids), got {labels.dtype}. Convert with "
            "labels.round().long() if they are integral floats, or argmax one-hot maps first."
        )
    shape = tuple(volume_shape)
    if labels.ndim == 4:
        labels = labels[:, None]
    if labels.ndim != 5 or labels.shape[1] != 1 or tuple(labels.shape[2:]) != shape:
        raise ValueError(
            f"labels must have shape (N, 1, {', '.join(map(str, shape))}) or (N, {', '.join(map(str, shape))}), "
            f"got {tuple(labels.shape)}. This model generates volumes of shape {shape}; crop or pad your "
            "labels to it."
        )
    if labels.shape[0] == 0:
        raise ValueError("labels is empty (N=0); pass at least one label map.")
    if labels.dtype in (torch.uint16, torch.uint32, torch.uint64):  # torch has no min/max for these
        labels = labels.to(torch.int64)
    lo, hi = int(labels.min()), int(labels.max())
    k = len(label_names)
    if lo < 0 or hi >= k:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"label ids must be in range(0, {k}) for this model ({list(label_names)}), "
            f"found id {bad}. Remap your labels to 0..{k - 1}."
        )
    return labels.long()


def sampling_autocast(pipe: DuoDiffusion, dtype: str | torch.dtype | None, num_inference_steps: int
                      ) -> torch.dtype | None:
    """The autocast dtype of a sampling call with ``dtype`` (``None``: float32).

    ``"auto"`` is :func:`~duodiff.precision.choose_dtype` (measured once per device, processor, threads and model,
    then cached). Low-precision weights (``to(dtype=...)`` / ``from_pretrained(dtype=...)``) need autocast to
    their own dtype: ``None`` means theirs, and another dtype is a ``ValueError``.
    """
    weights = pipe.dtype
    amp = choose_dtype(pipe, num_inference_steps) if is_auto(dtype) else resolve_dtype(dtype)
    if weights != torch.float32:
        if amp is None:
            amp = weights
        elif amp != weights:
            raise ValueError(
                f"dtype={dtype!r} does not match the pipeline's {weights} weights. Pass dtype=None (autocast to "
                f"{weights}) or cast the weights first with pipe.to(dtype=...)."
            )
    return amp


def make_plan(pipe: DuoDiffusion, options: SamplingOptions) -> SamplingPlan:
    """Check ``options`` against ``pipe``, before any work; return them resolved.

    Checks ``num_inference_steps`` against both training schedules and the ``class_volumes`` request, resolves
    ``dtype`` against the weights (``"auto"`` is measured here) and builds each stage's scheduler once (e.g.
    ``'dpmsolver++'`` without diffusers fails here).
    """
    c = pipe.config
    for kind in ("label", "image"):
        check_num_inference_steps(options.num_inference_steps, c.schedule_of(kind))
    values, mask, context, null_context = attribute_context(c, options.class_volumes, options.num_samples)
    amp = sampling_autocast(pipe, options.dtype, options.num_inference_steps)
    new_scheduler = functools.partial(stage_scheduler, pipe, options.scheduler, options.num_inference_steps)
    for kind in ("label", "image"):
        new_scheduler(kind)
    cols = [i for i, n in enumerate(attribute_names(c.attributes, c.label_names)) if n.startswith("volume:")]
    return SamplingPlan(options, new_scheduler, amp, values[:, cols], mask[:, cols], context, null_context)


def stage_scheduler(pipe: DuoDiffusion, scheduler: str | None, num_inference_steps: int, kind: str) -> Sampler:
    """A fresh ``scheduler`` sampler (``None``: the stage's own, DDIM or rflow) on the ``kind`` (``"label"`` /
    ``"image"``) training schedule of ``pipe``, with ``num_inference_steps`` timesteps on its device."""
    sched = make_scheduler(scheduler, pipe.config.schedule_of(kind))
    sched.set_timesteps(num_inference_steps, device=pipe.device)
    return sched

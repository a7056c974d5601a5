"""Helpers shared by sub-commands."""

from __future__ import annotations

import argparse
import sys

__all__ = ["DTYPE_CHOICES", "add_generation_arguments", "add_model_argument", "add_threads_argument", "check_device",
           "compute_note", "load_model", "model_name", "positive_int", "say"]

#: ``--dtype`` choices of the commands that generate pairs (``auto``: :func:`duodiff.precision.choose_dtype`).
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
_SCHEDULER_HELP = ("sampler (default: each stage's own, ddim, or rflow for a model trained with rectified flow; "
                   "dpmsolver++ and unipc need pip install \"duodiff[samplers]\")")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    """``--threads N``: torch's intra-op CPU threads for the whole command (applied by ``duodiff.cli.main``)."""
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="torch intra-op CPU threads for this command (default: OMP_NUM_THREADS if set, else the "
                        "cores other processes leave free: all on an idle machine, 1 beside another CPU-bound job)")


def add_generation_arguments(p: argparse.ArgumentParser, *, batch_size: int, device: str | None, dtype: str | None,
                             device_help: str = "torch device for generation, e.g. cpu or cuda:0",
                             dtype_help: str = "autocast dtype", scheduler_help: str = _SCHEDULER_HELP,
                             steps: int | None = None, steps_help: str = "") -> None:
    """``--steps``, ``--scheduler``, ``--batch-size``, ``--device`` and ``--dtype``: the :meth:`DuoDiffusion.sample`
    options of a command that generates pairs, spelt and checked the same in ``sample``, ``evaluate`` and
    ``export``. Each command gives its own defaults (``evaluate`` generates in float32 with the reference DDIM-50,
    ``sample`` picks a dtype and uses the library default, :data:`duodiff.schedulers.DEFAULT_NUM_INFERENCE_STEPS`)
    and may word the help of ``--device``, ``--dtype``, ``--scheduler`` and ``--steps`` for itself."""
    from ..schedulers import DEFAULT_NUM_INFERENCE_STEPS, DEFAULT_SCHEDULER, SAMPLERS

    steps = DEFAULT_NUM_INFERENCE_STEPS if steps is None else steps
    p.add_argument("--steps", type=positive_int, default=steps,
                   help=f"denoising steps per stage (default {steps}{steps_help})")
    p.add_argument("--scheduler", default=DEFAULT_SCHEDULER, choices=SAMPLERS, help=scheduler_help)
    p.add_argument("--batch-size", type=positive_int, default=batch_size)
    p.add_argument("--device", default=device, help=device_help)
    p.add_argument("--dtype", default=dtype, choices=list(DTYPE_CHOICES), help=dtype_help)


def say(message: str, enabled: bool = True) -> None:
    """One line on stderr saying what a command is doing now, before a phase that takes a while. Like the progress
    bars, these lines are progress output: ``--no-progress`` (``enabled=False``) hides them."""
    if enabled:
        print(message, file=sys.stderr, flush=True)


def compute_note(device: str | None, dtype: str | None = None, *, scheduler: str | None = None,
                 steps: int | None = None) -> str:
    """``"DDIM-50, float32, cpu, 2 threads"``: how a phase computes, for :func:`say` lines (``dtype=None`` and no
    ``steps``: ``"cpu, 2 threads"``; ``scheduler=None`` with ``steps``: ``"50 steps of each stage's own sampler"``;
    pass :func:`duodiff.schedulers.sampler_label` when the model is known)."""
    import torch

    parts = []
    if steps is not None:
        parts.append(f"{steps} steps of each stage's own sampler" if scheduler is None
                     else f"{scheduler.upper()}-{steps}")
    if dtype is not None:
        parts.append(dtype)
    kind = torch.device(device or "cpu").type
    if kind == "cpu":
        n = torch.get_num_threads()
        parts.append(f"cpu, {n} thread{'s' if n != 1 else ''}")
    else:
        parts.append(str(device))
    return ", ".join(parts)


def model_name(args: argparse.Namespace) -> str:
    """What ``--model`` names, for :func:`say` lines."""
    return "the bundled hippocampus model" if args.model is None else repr(args.model)


def check_device(device: str | None, option: str = "--device") -> None:
    """Refuse a device this torch cannot use (``cuda`` on a CPU-only build, a misspelt name) with a ``ValueError``
    (one line, exit code 2), before anything is loaded or written."""
    if not device:
        return
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise ValueError(f"{option} {device!r} is not a torch device; use e.g. cpu, cuda or cuda:0.") from None
    if kind == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ValueError(f"{option} {device!r}: no usable CUDA GPU (torch {torch.__version__} is {build}); use "
                         "--device cpu, or install a CUDA build of torch on a machine with a GPU.")
    if kind == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"{option} {device!r}: MPS is not available here; use --device cpu.")


def add_model_argument(p: argparse.ArgumentParser, *, positional: bool = False) -> None:
    help_ = "model folder or Hub repo id (default: the bundled hippocampus model)"
    if positional:
        p.add_argument("model", nargs="?", default=None, help=help_)
    else:
        p.add_argument("--model", "-m", default=None, help=help_)
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.add_argument("--variant", default=None, choices=["fp16"], help="load model.fp16.safetensors weights")


def load_model(args: argparse.Namespace, *, device: str | None = None, announce: bool = False):
    """The model ``--model`` / ``--revision`` / ``--variant`` name (the bundled one by default), on ``device``;
    with ``announce``, first a :func:`say` line naming it."""
    from ..bundled import BUNDLED_VARIANT, bundled_model_path
    from ..pipeline import DuoDiffusion

    say(f"loading model from {model_name(args)} ...", announce)
    if args.model is None:
        variant = args.variant or BUNDLED_VARIANT
        return DuoDiffusion.from_pretrained(bundled_model_path(), variant=variant, device=device)
    return DuoDiffusion.from_pretrained(args.model, revision=args.revision, variant=args.variant, device=device)

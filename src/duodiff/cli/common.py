"""Helpers shared by sub-commands."""

from __future__ import annotations

import argparse

__all__ = ["add_model_argument", "check_device", "load_model", "positive_int"]


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


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


def load_model(args: argparse.Namespace, *, device: str | None = None):
    from ..bundled import BUNDLED_VARIANT, bundled_model_path
    from ..pipeline import DuoDiffusion

    if args.model is None:
        variant = args.variant or BUNDLED_VARIANT
        return DuoDiffusion.from_pretrained(bundled_model_path(), variant=variant, device=device)
    return DuoDiffusion.from_pretrained(args.model, revision=args.revision, variant=args.variant, device=device)

"""``duodiff train``: train Duo-Diffusion stages from a TOML config (works under torchrun for DDP)."""

from __future__ import annotations

import argparse
import sys

from .common import add_threads_argument, check_device, compute_note, positive_int, say


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train Duo-Diffusion stages on a labelled NIfTI dataset",
                       description="Train the stages of a Duo-Diffusion model. See docs/training.md.")
    p.add_argument("config", help="TOML training config (see examples/*/train.toml)")
    p.add_argument("--stage", action="append", default=None,
                   help="stage to train (repeatable): label_autoencoder, image_autoencoder, label_unet, image_unet, "
                        "image_controlnet or all (default all)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoints")
    p.add_argument("--finetune", action="store_true",
                   help="train finished stages further from their current weights (fresh optimiser and LR "
                        "schedule over the stage's steps) instead of from their initial weights")
    p.add_argument("--stop-after", type=positive_int, default=None,
                   help="stop each stage after this many total steps (resume later with --resume)")
    p.add_argument("--output-dir", default=None, help="override output_dir of the config")
    p.add_argument("--device", default=None, help="override device of the config")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars and the lines announcing each phase")
    add_threads_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..train import load_train_config
    from ..train.trainer import Trainer

    overrides = {}
    if args.output_dir:
        overrides["output_dir"] = args.output_dir
    if args.device:
        overrides["device"] = args.device
    if args.no_progress:
        overrides["progress"] = False
    cfg = load_train_config(args.config, overrides)
    check_device(cfg.device, "--device" if args.device else "device (in the config)")
    with Trainer(cfg) as trainer:  # destroys a process group it created (torchrun) before the interpreter exits
        stages = ", ".join(args.stage) if args.stage else "all stages"
        say(f"training {stages} from {args.config} into {cfg.output_dir} ({compute_note(cfg.device)}) ...",
            trainer.is_main and cfg.progress)
        model_dir = trainer.run(args.stage, resume=args.resume, stop_after=args.stop_after, finetune=args.finetune)
    if not trainer.is_main:
        return 0
    if trainer.stopped:
        stage, step, steps = trainer.stopped
        print(f"stopped at step {step} of {steps} of stage {stage} (--stop-after); continue with "
              f"`duodiff train {args.config} --resume`", file=sys.stderr)
        print(f"model so far written to {model_dir}", file=sys.stderr)
    elif trainer.skipped and not trainer.completed:
        print(f"nothing to do: stage(s) {', '.join(trainer.skipped)} already finished in {cfg.output_dir}; the "
              f"model is {model_dir} (--finetune trains further, a new --output-dir starts over)", file=sys.stderr)
    else:
        print(f"model written to {model_dir}", file=sys.stderr)
    return 0

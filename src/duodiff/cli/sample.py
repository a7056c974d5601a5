"""``duodiff sample``: generate pairs and write them as NIfTI (nnU-Net naming) + dataset.json."""

from __future__ import annotations

import argparse
import sys
import warnings

from .common import (
    add_generation_arguments,
    add_model_argument,
    add_threads_argument,
    check_device,
    compute_note,
    load_model,
    positive_int,
    say,
)


def add_parser(sub) -> None:
    p = sub.add_parser("sample", help="generate synthetic (image, label) NIfTI pairs",
                       description="Generate synthetic pairs into OUT/imagesTr and OUT/labelsTr.")
    add_model_argument(p)
    p.add_argument("-n", "--num-samples", type=positive_int, default=4, help="number of pairs (default 4)")
    p.add_argument("--out", "-o", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="first seed; sample i uses seed+i (default 0)")
    add_generation_arguments(
        p, batch_size=4, device="cpu", dtype="auto", device_help="torch device, e.g. cpu or cuda:0",
        dtype_help="autocast dtype (default auto: the fastest dtype whose output matches float32 within 5%%, timed on "
                   "first use of the model on this machine and cached; bfloat16 alone was 1.1x faster than float32 "
                   "on a 2-core Xeon, 1.8x on an AMD EPYC; docs/performance.md)",
        scheduler_help="sampler (default: each stage's own, ddim, or rflow for a model trained with rectified flow); "
                       "dpmsolver++ and unipc are few-step solvers (10-20 steps) that need diffusers: pip install "
                       "\"duodiff[samplers]\"")
    p.add_argument("--prefix", default="duodiff", help="case-name prefix (default duodiff)")
    p.add_argument("--resume", action="store_true",
                   help="skip seeds whose label file already exists in OUT (after an interrupted run)")
    p.add_argument("--class-volume", action="append", default=[], metavar="NAME=ML",
                   help="request a foreground class volume in mL (repeatable; needs a volume-conditioned model; "
                        "more than the field of view is an error, far outside the training range a warning)")
    p.add_argument("--guidance-scale", type=float, default=1.0, help="classifier-free guidance of the label stage")
    p.add_argument("--volume-tolerance", type=float, default=None,
                   help="regenerate samples whose volumes miss the request by more than this fraction (e.g. 0.15)")
    p.add_argument("--qc", default=None, metavar="DIR",
                   help="pair-consistency QC with a segmenter folder (segmenter.json + .safetensors, written by "
                        "`duodiff evaluate`); failing pairs are regenerated")
    p.add_argument("--qc-threshold", type=float, default=0.5, help="QC Dice threshold (default 0.5)")
    p.add_argument("--max-retries", type=int, default=3, help="regeneration rounds for rejected samples")
    p.add_argument("--decode-tile-size", default="auto", metavar="auto|none|N|H,W,D",
                   help="VAE decoding: auto (whole volumes one by one, exact, whatever the free memory; default), "
                        "none (whole batch at once), or a tile size in latent voxels (approximate, less memory)")
    p.add_argument("--distributed", action="store_true",
                   help="split the seeds across the processes of a torchrun launch into one --out folder "
                        "(automatic when WORLD_SIZE > 1)")
    p.add_argument("--preview", default=None, metavar="PNG",
                   help="also write a preview montage to PNG (.png is added to a name without suffix; an existing "
                        "folder gets preview.png inside it; its folder must exist or be --out)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars and the lines announcing each phase")
    add_threads_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..decoding import parse_tile_size
    from ..distributed import DistributedContext, finalize_folder, init_distributed, is_torchrun
    from ..output import sample_name
    from ..schedulers import check_sampler_fits, sampler_label, schedules

    if not args.out.strip():
        raise ValueError("--out is empty (an unset shell variable?); pass the folder to write the pairs to.")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {str(out)!r} exists and is not a folder; choose a folder path.")
    # every argument is checked before the model loads, a progress bar starts or a folder is created
    tile = parse_tile_size(args.decode_tile_size)
    check_sampling_args(args)
    class_volumes = parse_class_volumes(args.class_volume)
    preview = None
    if args.preview is not None:
        from ..preview import preview_path

        preview = preview_path(args.preview, will_exist=[out])
    # under torchrun each rank takes seeds[rank::world_size]; resuming filters each rank's own share
    dist = init_distributed(args.device) if args.distributed or is_torchrun() else DistributedContext()
    shard = dist.shard(range(args.seed, args.seed + args.num_samples))
    seeds = shard
    if args.resume:
        seeds = [s for s in seeds if not (out / "labelsTr" / f"{sample_name(s, args.prefix)}.nii.gz").exists()]
    announce = dist.is_main and not args.no_progress
    pipe = load_model(args, device=dist.device(args.device), announce=announce)
    with warnings.catch_warnings():  # refuse impossible volumes before writing anything; sample() warns
        warnings.simplefilter("ignore")
        pipe.check_class_volumes(class_volumes)
    check_sampler_fits(args.scheduler, pipe)  # before any output
    qc = None
    if args.qc:
        from ..segmenter import SliceSegmenter

        qc = SliceSegmenter.load(args.qc).to(args.device).eval()
    reports = []
    created = not out.exists()
    try:  # fail before sampling, not after it
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"Cannot create output folders in {str(out)!r}: {e}. Choose a writable --out.") from e
    written = 0
    from tqdm.auto import tqdm

    who = f" over {dist.world_size} processes" if dist.is_distributed else ""
    dtype = args.dtype
    if dtype == "auto":  # timed on the first use of this model here (a few seconds), then read from the cache
        from ..precision import choose_dtype

        if not dist.is_main:
            dist.barrier()  # rank 0 measures and caches first; ranks on its machine then read its choice
        dtype = str(choose_dtype(pipe, args.steps)).removeprefix("torch.")
        if dist.is_main:
            dist.barrier()
    how = compute_note(str(pipe.device), f"{dtype} ({args.dtype})" if dtype != args.dtype else dtype,
                       scheduler=sampler_label(args.scheduler, schedules(pipe)), steps=args.steps)
    say(f"generating {len(seeds)} pair(s){who} ({how}, batch {args.batch_size}) into {out} ...", announce)

    bar = tqdm(total=len(seeds), desc="pairs", disable=args.no_progress or not dist.is_main)
    try:
        for start in range(0, len(seeds), args.batch_size):
            chunk = seeds[start : start + args.batch_size]
            result = pipe.sample(len(chunk), seed=chunk, num_inference_steps=args.steps, scheduler=args.scheduler,
                                 dtype=dtype, progress=not args.no_progress, class_volumes=class_volumes,
                                 guidance_scale=args.guidance_scale, volume_tolerance=args.volume_tolerance, qc=qc,
                                 qc_threshold=args.qc_threshold, max_retries=args.max_retries,
                                 decode_tile_size=tile)
            if result.report:
                reports.append(result.report)
            result.save(out, prefix=args.prefix)
            written += len(chunk)
            bar.update(len(chunk))
    except BaseException:
        bar.close()
        if created and dist.is_main:
            _remove_if_empty(out)  # never leave an empty --out folder behind a failed run
        raise
    bar.close()
    dist.barrier()  # every rank has written its cases; rank 0 fixes dataset.json and writes the preview
    if dist.is_distributed and dist.is_main:
        finalize_folder(out)
    if reports:
        attempts = sum(r["attempts"] for r in reports)
        failed = [s for r in reports for s in r["failed_seeds"]]
        print(f"acceptance: {written - len(failed)}/{written} pairs met the constraints in {attempts} attempts "
              f"(rate {(written - len(failed)) / max(attempts, 1):.2f}); {len(failed)} kept but failing: {failed}",
              file=sys.stderr)
    who = f"rank {dist.rank}/{dist.world_size}: " if dist.is_distributed else ""
    print(f"{who}wrote {written} pair(s) to {out} ({len(shard) - len(seeds)} already there)", file=sys.stderr)
    if preview is not None and dist.is_main:
        from ..preview import preview_folder

        say(f"drawing the preview {preview} ...", announce)
        print(f"wrote preview {preview_folder(out, preview)}", file=sys.stderr)
    dist.close()
    return 0


def check_sampling_args(args: argparse.Namespace) -> None:
    """The checks :meth:`DuoDiffusion.sample` makes that need no model, made before the model loads."""
    check_device(args.device)
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}.")
    if not args.guidance_scale >= 0:
        raise ValueError(f"--guidance-scale must be >= 0, got {args.guidance_scale}.")
    if args.volume_tolerance is not None and not (args.class_volume and args.volume_tolerance > 0):
        raise ValueError(f"--volume-tolerance needs --class-volume and a value > 0, got {args.volume_tolerance}.")
    if args.max_retries < 0:
        raise ValueError(f"--max-retries must be >= 0, got {args.max_retries}.")
    if not 0 <= args.qc_threshold <= 1:
        raise ValueError(f"--qc-threshold is a Dice in [0, 1], got {args.qc_threshold}.")
    if args.qc is not None:
        from pathlib import Path

        if not Path(args.qc).is_dir():
            raise FileNotFoundError(f"--qc {args.qc!r} is not a folder; pass a segmenter folder written by "
                                    "`duodiff evaluate` (segmenter.json + .safetensors).")


def _remove_if_empty(folder) -> None:
    """Remove ``folder`` if it holds no files (only empty sub-folders)."""
    import shutil

    if folder.is_dir() and not any(p.is_file() or p.is_symlink() for p in folder.rglob("*")):
        shutil.rmtree(folder, ignore_errors=True)


def parse_class_volumes(items: list[str]) -> dict[str, float] | None:
    """``["Anterior=1.5", "2=0.3"]`` -> ``{"Anterior": 1.5, 2: 0.3}`` (mL)."""
    if not items:
        return None
    out: dict = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            ml = float(value)
        except ValueError:
            ml = None
        if not sep or not name or ml is None:
            raise ValueError(f"--class-volume must look like NAME=ML (e.g. Anterior=1.5), got {item!r}.")
        out[int(name) if name.isdigit() else name] = ml
    return out

"""``duodiff evaluate``: compare generated pairs with real ones (FID-2.5D, MS-SSIM, MMD, labels, consistency,
memorisation, detectability; autoencoder fidelity when a model is given) and write report.json, report.md and
PNG figures."""

from __future__ import annotations

import argparse
import sys

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
    from ..schedulers import DEFAULT_NUM_INFERENCE_STEPS, REFERENCE_NUM_INFERENCE_STEPS

    p = sub.add_parser(
        "evaluate", help="score synthetic pairs against real ones and write a report",
        description="Generate N pairs (or read --synthetic), compare them with real pairs from an MSD / nnU-Net "
                    "folder, and write report.json, report.md and figures into --out. Offline: the feature "
                    "network and the consistency segmenter are trained on the real pairs (or loaded).")
    add_model_argument(p)
    p.add_argument("--real", required=True, help="real data folder with imagesTr/ and labelsTr/ (MSD or nnU-Net)")
    p.add_argument("--cases", default=None,
                   help="restrict the real set to these cases: a text file (one name per line), a split JSON with "
                        "its key (split.json:test) or a comma list")
    p.add_argument("--resample", action="store_true",
                   help="resample real volumes to the model's voxel spacing (as training with target_spacing does)")
    p.add_argument("-n", "--num-samples", type=positive_int, default=64, help="pairs to generate (default 64)")
    p.add_argument("--out", "-o", required=True, help="report folder")
    p.add_argument("--synthetic", default=None,
                   help="evaluate this folder of existing pairs instead of generating (no --model needed)")
    p.add_argument("--normalize-synthetic", action="store_true",
                   help="percentile-normalise --synthetic images like the real ones (when they are not in [0, 1])")
    p.add_argument("--seed", type=int, default=0, help="first sample seed; also seeds the segmenter (default 0)")
    add_generation_arguments(p, batch_size=8, device="cpu", dtype="float32", dtype_help="autocast dtype for generation",
                             steps=REFERENCE_NUM_INFERENCE_STEPS,
                             steps_help=": DDIM-50 is the reference of every published number; duodiff "
                                        f"sample defaults to {DEFAULT_NUM_INFERENCE_STEPS} steps, of equal quality "
                                        "(docs/performance.md)")
    p.add_argument("--segmenter", default=None, metavar="DIR",
                   help="load a segmenter saved by an earlier run (DIR with segmenter.safetensors) instead of "
                        "training one")
    p.add_argument("--segmenter-steps", type=positive_int, default=300,
                   help="training steps of the segmenter / feature network (default 300)")
    p.add_argument("--feature-network", default=None, metavar="SPEC",
                   help="opt-in torch.hub feature network 'owner/repo:entrypoint' (downloads) or "
                        "'local:/dir:entrypoint'; default: the segmenter's encoder")
    p.add_argument("--train-real", default=None, metavar="DIR",
                   help="the model's training data: the memorisation reference and the segmenter's training set "
                        "(default: --real, of which 20%% are held out from the segmenter)")
    p.add_argument("--train-cases", default=None,
                   help="cases of --train-real to use (file, split.json:train or comma list)")
    p.add_argument("--copy-threshold", type=float, default=0.95,
                   help="nearest-real NCC at which a synthetic image counts as a near-copy (default 0.95)")
    p.add_argument("--max-pairs", type=positive_int, default=500, help="pairs per set for MS-SSIM (default 500)")
    p.add_argument("--detector-steps", type=int, default=150,
                   help="training steps per fold of the real-vs-synthetic 3D CNN (detectability ROC AUC); 0 skips "
                        "it (default 150)")
    p.add_argument("--detector-folds", type=int, default=5,
                   help="cross-validation folds of the detector (default 5)")
    p.add_argument("--save-synthetic", action="store_true", help="also write the generated pairs to OUT/synthetic")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars and the lines announcing each phase")
    add_threads_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from ..data.reading import DEFAULT_INTENSITY_PERCENTILES
    from ..metrics import PairSet, evaluate, load_pairs, parse_cases, read_label_names, write_report
    from ..schedulers import check_sampler_fits, sampler_label, schedules
    from ..segmenter import SliceSegmenter

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {str(out)!r} exists and is not a folder; choose a folder path.")
    if not 0.0 < args.copy_threshold <= 1.0:
        raise ValueError(f"--copy-threshold must be in (0, 1], got {args.copy_threshold}.")
    if args.normalize_synthetic and not args.synthetic:
        raise ValueError("--normalize-synthetic only applies to --synthetic folders; drop it or pass --synthetic.")
    check_device(args.device)
    progress = not args.no_progress
    setup: dict = {"real": str(args.real)}
    timing: dict[str, float] = {}

    # 1. model (not needed when an existing synthetic folder is evaluated without --model)
    pipe = None
    if args.synthetic is None or args.model is not None:
        pipe = load_model(args, device=args.device, announce=progress)
        setup["model"] = str(args.model) if args.model is not None else "bundled"
        if args.synthetic is None:
            check_sampler_fits(args.scheduler, pipe)  # before reading the real pairs

    # 2. real pairs on the model's grid (read first so that a bad folder fails before generation)
    t = time.perf_counter()
    # the model's recorded preprocessing; models saved before it was recorded (and no model): 0.5 / 99.5
    percentiles = DEFAULT_INTENSITY_PERCENTILES
    if pipe is not None and pipe.config.intensity_percentiles is not None:
        percentiles = tuple(pipe.config.intensity_percentiles)
    setup["intensity_percentiles"] = list(percentiles)
    synthetic = None
    if pipe is None:
        synthetic = load_pairs(args.synthetic, normalize=args.normalize_synthetic, intensity_percentiles=percentiles)
    volume_shape = tuple(pipe.config.volume_shape) if pipe is not None else tuple(synthetic.images.shape[2:])
    spacing = tuple(pipe.config.spacing) if pipe is not None else tuple(synthetic.spacing)
    resample = spacing if args.resample else None
    cases = parse_cases(args.cases)
    say(f"reading real pairs from {args.real}" + (f" ({args.cases})" if args.cases else "") + " ...", progress)
    real = load_pairs(args.real, volume_shape=volume_shape, cases=cases, resample_spacing=resample,
                      intensity_percentiles=percentiles)
    train_real = None
    if args.train_real is not None:
        train_real = load_pairs(args.train_real, volume_shape=volume_shape, cases=parse_cases(args.train_cases),
                                resample_spacing=resample, intensity_percentiles=percentiles)
        setup["train_real"] = str(args.train_real)
    timing["load_real_s"] = time.perf_counter() - t
    if cases is not None:
        setup["cases"] = f"{len(cases)} listed ({args.cases if len(str(args.cases)) < 80 else 'from a list'})"
    setup["preprocessing"] = real.info["preprocessing"]

    # 3. synthetic pairs: an existing folder or generated now
    t = time.perf_counter()
    if args.synthetic is not None:
        if synthetic is None:
            synthetic = load_pairs(args.synthetic, normalize=args.normalize_synthetic,
                                   intensity_percentiles=percentiles)
        setup["synthetic_source"] = f"folder {args.synthetic}"
        if tuple(synthetic.images.shape[2:]) != volume_shape:
            raise ValueError(f"--synthetic volumes are {tuple(synthetic.images.shape[2:])} but the model makes "
                             f"{volume_shape}; drop --model or pass the model that made them.")
    else:
        how = compute_note(args.device, args.dtype or "float32", steps=args.steps,
                           scheduler=sampler_label(args.scheduler, schedules(pipe)))
        say(f"generating {args.num_samples} pair(s) ({how}, batch {args.batch_size}) ...", progress)
        result = pipe.sample(args.num_samples, seed=args.seed, num_inference_steps=args.steps,
                             scheduler=args.scheduler, batch_size=args.batch_size, dtype=args.dtype,
                             progress=progress)
        synthetic = PairSet(result.images, result.labels, tuple(result.spacing), result.names(),
                            {"seeds": result.seeds})
        setup.update(synthetic_source="generated", num_inference_steps=args.steps,
                     scheduler=sampler_label(args.scheduler, schedules(pipe)).lower(),
                     dtype=args.dtype, first_seed=args.seed)
        if args.save_synthetic:
            result.save(out / "synthetic")
    timing["synthetic_s"] = time.perf_counter() - t

    # 4. classes
    if pipe is not None:
        num_classes, names = pipe.config.num_classes, list(pipe.config.label_names)
    else:
        found = read_label_names(args.synthetic) or read_label_names(args.real)
        top = int(max(int(real.labels.max()), int(synthetic.labels.max()))) + 1
        num_classes = max(top, len(found) if found else 0)
        names = list(found) if found and len(found) == num_classes else None

    # 5. networks
    segmenter = SliceSegmenter.load(args.segmenter) if args.segmenter else None
    feature_network = None
    if args.feature_network:
        from ..metrics import load_hub_feature_network

        feature_network = load_hub_feature_network(args.feature_network)
        setup["feature_network_spec"] = args.feature_network
    if segmenter is not None and segmenter.num_classes != num_classes:
        raise ValueError(f"--segmenter {args.segmenter!r} predicts {segmenter.num_classes} classes but the data has "
                         f"{num_classes}; pass a segmenter trained on this dataset or drop --segmenter.")

    # 6. metrics and report
    seg = (f"segmenter loaded from {args.segmenter}" if segmenter is not None else
           f"training the segmenter / feature network ({args.segmenter_steps} steps)")
    det = (f", detectability ({args.detector_folds} folds x {args.detector_steps} steps)" if args.detector_steps > 0
           else "")
    say(f"scoring {len(synthetic)} synthetic vs {len(real)} real pairs: {seg}, FID-2.5D, MS-SSIM, labels, "
        f"memorisation{det} ({compute_note('cpu')}) ...", progress)
    ev = evaluate(real, synthetic, num_classes=num_classes, label_names=names, segmenter=segmenter,
                  feature_network=feature_network, memorization_reference=train_real, segmenter_data=train_real,
                  segmenter_steps=args.segmenter_steps, copy_threshold=args.copy_threshold,
                  max_pairs=args.max_pairs, seed=args.seed, progress=progress,
                  image_autoencoder=pipe.image_autoencoder if pipe is not None else None,
                  label_autoencoder=pipe.label_autoencoder if pipe is not None else None,
                  detector_steps=args.detector_steps, detector_folds=args.detector_folds)
    ev.metrics["setup"].update(setup)
    ev.metrics["timing_s"] = {**{k: round(v, 3) for k, v in timing.items()}, **ev.metrics["timing_s"]}
    written = write_report(ev, out, real=real, synthetic=synthetic)
    m = ev.metrics
    fid = m["fid_2p5d"]
    print(f"FID-2.5D mean {fid['mean']:.3f} (real half-vs-half {fid['real_split_half']['mean']:.3f}), "
          "pair-consistency Dice "
          f"{m['pair_consistency']['synthetic']['mean_dice']:.3f}, "
          f"near-copies {m['memorization']['num_flagged']}/{len(synthetic)}", file=sys.stderr)
    if m["detectability"]:
        print(f"detectability ROC AUC {m['detectability']['auc']:.3f} ± {m['detectability']['auc_std']:.3f} "
              "(0.5 = indistinguishable)", file=sys.stderr)
    if m["autoencoder_fidelity"]:
        fid_ae = m["autoencoder_fidelity"]
        dice = ", ".join(f"{k} {v:.3f}" for k, v in fid_ae["label"]["dice"].items())
        print(f"image autoencoder PSNR {fid_ae['image']['psnr_db']['mean']:.2f} dB, SSIM "
              f"{fid_ae['image']['ssim']['mean']:.3f}, L1 {fid_ae['image']['l1']['mean']:.4f}; label autoencoder "
              f"Dice {dice}", file=sys.stderr)
    print(f"wrote {', '.join(sorted(p.name for p in written.values()))} to {out}", file=sys.stderr)
    return 0

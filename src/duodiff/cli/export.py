"""``duodiff export nnunet``: write real + synthetic pairs as an nnU-Net v2 raw dataset."""

from __future__ import annotations

import argparse
import sys

from .common import check_device, positive_int


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"must be a comma-separated list of names, got {text!r}")
    return names


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export pairs for other tools (nnU-Net)",
                       description="Export real and synthetic pairs in another tool's dataset format.")
    formats = p.add_subparsers(dest="format", metavar="FORMAT")
    formats.required = True
    n = formats.add_parser(
        "nnunet", help="write an nnU-Net v2 raw dataset (DatasetXXX_Name/ with imagesTr, labelsTr, dataset.json)",
        description="Write OUT/DatasetXXX_NAME/ for nnU-Net v2 with the real cases (names and headers kept) plus "
                    "synthetic cases copied from a `duodiff sample` folder or generated from a model. Then run "
                    "nnUNetv2_plan_and_preprocess -d ID --verify_dataset_integrity.")
    n.add_argument("--real", default=None, metavar="DIR", help="real data: folder with imagesTr/ and labelsTr/ "
                   "(nnU-Net or MSD layout)")
    n.add_argument("--synthetic", default=None, metavar="DIR_OR_MODEL",
                   help="folder written by `duodiff sample`, or a model folder / Hub repo id to generate from")
    n.add_argument("-n", "--num-samples", type=positive_int, default=None,
                   help="synthetic cases: required with a model; with a folder the first N (default all)")
    n.add_argument("--dataset-id", type=int, required=True, help="nnU-Net dataset id (1-999)")
    n.add_argument("--name", required=True, help="dataset name, e.g. HippoSynth")
    n.add_argument("--out", "-o", required=True, metavar="NNUNET_RAW", help="nnU-Net raw folder ($nnUNet_raw)")
    n.add_argument("--label-names", type=_names, default=None, metavar="A,B,C",
                   help="class names, background first (default: from dataset.json / the model)")
    n.add_argument("--channel-names", type=_names, default=None, metavar="A,B",
                   help="image channel names (default: from dataset.json, else MRI)")
    n.add_argument("--seed", type=int, default=0, help="first seed when generating (default 0)")
    n.add_argument("--steps", type=positive_int, default=50, help="denoising steps per stage (default 50)")
    n.add_argument("--scheduler", default="ddim", choices=["ddim", "ddpm", "pndm"])
    n.add_argument("--batch-size", type=positive_int, default=4)
    n.add_argument("--device", default=None, help="torch device for generation, e.g. cpu or cuda:0")
    n.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="autocast dtype")
    n.add_argument("--prefix", default="duodiff", help="synthetic case-name prefix (default duodiff)")
    n.add_argument("--overwrite", action="store_true", help="replace an existing DatasetXXX_NAME folder")
    n.add_argument("--no-progress", action="store_true", help="hide progress bars")
    n.set_defaults(func=run_nnunet)


def run_nnunet(args: argparse.Namespace) -> int:
    from ..export import export_nnunet

    if not args.out.strip():
        raise ValueError("--out is empty (an unset $nnUNet_raw?); pass the nnU-Net raw folder to write "
                         "DatasetXXX_NAME/ into.")
    check_device(args.device)
    if args.real is None and args.synthetic is None:
        raise ValueError("Nothing to export: pass --real DIR and/or --synthetic DIR_OR_MODEL.")
    result = export_nnunet(
        args.out, dataset_id=args.dataset_id, name=args.name, real=args.real, synthetic=args.synthetic,
        num_synthetic=args.num_samples, seed=args.seed, num_inference_steps=args.steps, scheduler=args.scheduler,
        batch_size=args.batch_size, device=args.device, dtype=args.dtype, prefix=args.prefix,
        label_names=args.label_names, channel_names=args.channel_names, overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(f"wrote {result.path} ({len(result.real_cases)} real + {len(result.synthetic_cases)} synthetic cases, "
          f"labels {list(result.label_names)})", file=sys.stderr)
    print(f"next: export nnUNet_raw={result.path.parent} && nnUNetv2_plan_and_preprocess -d "
          f"{args.dataset_id} --verify_dataset_integrity", file=sys.stderr)
    return 0

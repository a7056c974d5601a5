"""``duodiff convert``: import MONAI Generative 0.2.3 / MONAI-core ``.pt`` state dicts into a duodiff folder."""

from __future__ import annotations

import argparse
import sys

from .common import add_threads_argument


def add_parser(sub) -> None:
    from .. import keys

    p = sub.add_parser(
        "convert",
        help="import .pt state dicts (MONAI Generative 0.2.3 or MONAI core) into a duodiff model folder",
        description="Read five PyTorch state dicts with torch.load(weights_only=True), convert MONAI Generative "
        "0.2.3 key names to MONAI core, load them strictly into the architecture of --config and write a normal "
        "duodiff folder (safetensors).",
    )
    p.add_argument("--config", required=True,
                   help="architecture: a JSON file holding PipelineConfig.to_dict(), or a duodiff model folder")
    for name in keys.COMPONENTS:
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, required=True, metavar="PT",
                       help=f"state dict of the {name.replace('_', ' ')}")
    p.add_argument("--out", "-o", required=True, help="model folder to write (must not exist or be empty)")
    p.add_argument("--key", default=None,
                   help="entry holding the state dict inside wrapped checkpoints, e.g. 'model' (default: detect)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out folder")
    add_threads_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import keys
    from ..convert import convert_checkpoints

    checkpoints = {name: getattr(args, name) for name in keys.COMPONENTS}
    infos = convert_checkpoints(args.config, checkpoints, args.out, key=args.key, overwrite=args.overwrite)
    for info in infos:
        print(info)
    print(f"wrote {args.out}; load it with DuoDiffusion.from_pretrained({args.out!r})", file=sys.stderr)
    return 0

"""``duodiff preview``: a PNG montage (axial/coronal/sagittal, label overlay) of a sample folder or NIfTI."""

from __future__ import annotations

import argparse
import sys

from .common import add_threads_argument, positive_int


def add_parser(sub) -> None:
    p = sub.add_parser("preview", help="write a PNG montage of a sample folder or a NIfTI image")
    p.add_argument("path", help="folder with imagesTr/labelsTr, or a NIfTI image")
    p.add_argument("--label", default=None, help="label NIfTI to overlay when PATH is a single image")
    p.add_argument("--out", "-o", required=True,
                   help="PNG to write (.png is added to a name without suffix); an existing folder gets "
                        "preview.png inside it. Its folder must exist: no folders are created")
    p.add_argument("--max-cases", type=positive_int, default=4)
    add_threads_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..preview import preview_folder

    out = preview_folder(args.path, args.out, max_cases=args.max_cases, label=args.label)
    print(f"wrote preview {out}", file=sys.stderr)
    return 0

"""``duodiff`` entry point: argument parsing, sub-command dispatch and error reporting.

Bad input exits with code 2 and one line saying what is wrong and how to fix it; ``--debug`` shows
the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import typing
from collections.abc import Sequence

__all__ = ["main", "build_parser", "COMMANDS"]

#: sub-command name -> module in ``duodiff.cli`` defining ``add_parser(subparsers)`` and ``run(args)``.
COMMANDS = {
    "sample": "sample",
    "info": "info",
    "preview": "preview",
    "evaluate": "evaluate",
    "export": "export",
    "convert": "convert",
    "train": "train",
    "bench": "bench",
}

#: Exceptions that mean "the user gave bad input": reported in one line with exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, FileNotFoundError, FileExistsError,
                                                 PermissionError, NotADirectoryError, IsADirectoryError, KeyError,
                                                 OSError, ImportError)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (exit code 2), like every other duodiff error."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="duodiff",
        description="Generate paired synthetic 3D (image, label) volumes with a Duo-Diffusion model.",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"duodiff {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in COMMANDS.values():
        importlib.import_module(f"duodiff.cli.{module}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line, not only before the sub-command
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args = parser.parse_args(argv)
    args.debug = debug
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("duodiff: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if args.debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, KeyError):
            msg = msg.strip("'\"")
        print(f"duodiff {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

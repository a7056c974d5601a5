"""``duodiff`` entry point: argument parsing, sub-command dispatch and error reporting.

Exit codes: ``0`` success; ``2`` a user error (bad arguments or values, duodiff's typed errors such as
``ConfigError``, a file or folder the user named that is missing or unusable), reported in one line saying
what is wrong and how to fix it; ``1`` anything else, i.e. an internal error (a bug in duodiff or a
dependency, running out of memory), reported in one line that names the exception and says to rerun with
``--debug``; ``130`` interrupted. ``--debug`` (anywhere on the line) shows the full traceback instead.

Every command takes ``--threads N`` (torch's intra-op CPU threads for the command; ``duodiff bench`` passes it to
its script; default: the cores other processes leave free, 1 on a busy machine, unless ``OMP_NUM_THREADS`` is
set), and long commands say on stderr what they are doing before each phase.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import os
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

#: Exceptions that mean "the user gave bad input": reported in one line with exit code 2. ``ValueError`` covers
#: duodiff's typed errors (``ConfigError``, ``ModelLoadError``, ``BadCaseError``, ``NonFiniteError``) and every
#: validation of arguments and files. ``TypeError``, ``KeyError``, ``ImportError``, other ``OSError`` s, ... are
#: internal errors (exit code 1): the CLI passes well-typed values, so they mean a bug.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError, PermissionError,
                                                 NotADirectoryError, IsADirectoryError)
#: ``OSError`` s that are about a path the user named (also when re-raised with a clearer message).
_PATH_ERRORS = USER_ERRORS[1:]
#: ``OSError`` numbers the user fixes by choosing another place or freeing space (read-only, full, too long).
_USER_ERRNOS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG}


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` is the user's to fix (exit code 2) rather than an internal error (exit code 1).

    User errors: :data:`USER_ERRORS`; an ``OSError`` that duodiff re-raised with a clearer message from a path
    error (``raise OSError("Cannot create ... choose a writable --out") from PermissionError``); a read-only or
    full disk or a too-long name (also when re-raised); a missing
    optional third-party package (``ModuleNotFoundError`` for a module outside duodiff, or duodiff's
    ``ImportError`` with a ``pip install`` hint).
    """
    if isinstance(exc, USER_ERRORS):
        return True
    if isinstance(exc, OSError):
        cause = exc.__cause__
        return isinstance(cause, _PATH_ERRORS) or exc.errno in _USER_ERRNOS or (
            isinstance(cause, OSError) and cause.errno in _USER_ERRNOS)
    if isinstance(exc, ImportError):
        if "pip install" in str(exc):  # duodiff's own "X needs Y: pip install 'duodiff[extra]'"
            return True
        missing = exc if isinstance(exc, ModuleNotFoundError) else exc.__cause__
        name = getattr(missing, "name", None) if isinstance(missing, ModuleNotFoundError) else None
        return bool(name) and name.split(".")[0] != "duodiff"
    return False


def _first_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return msg.strip("'\"") if isinstance(exc, KeyError) else msg


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (exit code 2), like every other duodiff error."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _threads(num_threads: int | None) -> typing.ContextManager[None]:
    """``--threads N``: the command runs with ``N`` intra-op CPU threads (``duodiff.threads.intra_op_threads``).

    Without ``--threads`` and ``OMP_NUM_THREADS``, with as many as other processes leave free
    (``duodiff.threads.threads_for_load``): all cores on an idle machine, 1 beside another CPU-bound job, where
    torch's default of one spinning OpenMP thread per core ran 8-10x slower (``benchmarks/oversubscription.py``).
    """
    if num_threads is None and os.environ.get("OMP_NUM_THREADS"):
        return contextlib.nullcontext()
    from ..threads import intra_op_threads, threads_for_load

    return intra_op_threads(threads_for_load() if num_threads is None else num_threads)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="duodiff",
        description="Generate paired synthetic 3D (image, label) volumes with a Duo-Diffusion model.",
    )
    from .._version import __version__

    parser.add_argument("--version", action="version", version=f"duodiff {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback on errors (accepted anywhere on the line)")
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
        with _threads(getattr(args, "threads", None)):
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("duodiff: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        msg = _first_line(e)
        if is_user_error(e):
            print(f"duodiff {args.command}: error: {msg or type(e).__name__}", file=sys.stderr)
            return 2
        print(f"duodiff {args.command}: internal error: {type(e).__name__}{': ' + msg if msg else ''} "
              f"(rerun with --debug to see the traceback; if it is a bug, please report it with that)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""CLI exit codes (issue 14, fault 12): user errors exit 2 in one line; internal errors exit 1 in one line that
says how to get the traceback (``--debug``), which then shows it."""

from __future__ import annotations

import errno
import subprocess
import sys
import textwrap

import pytest

from duodiff.cli import info
from duodiff.cli.main import is_user_error, main
from duodiff.config import ConfigError
from duodiff.io import NonFiniteError


def _run_raising(exc: BaseException, monkeypatch, capsys, *extra: str) -> tuple[int, str]:
    def run(args):
        raise exc

    monkeypatch.setattr(info, "run", run)
    code = main([*extra, "info", "some-model"])
    out, err = capsys.readouterr()
    assert out == ""
    return code, err


def _chained(exc: BaseException, cause: BaseException) -> BaseException:
    exc.__cause__ = cause
    return exc


INTERNAL = [
    TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'"),
    KeyError("label_unet"),
    OSError(errno.EIO, "Input/output error"),
    ImportError("cannot import name 'helper' from 'duodiff.metrics'"),
    ModuleNotFoundError("No module named 'duodiff.nothere'", name="duodiff.nothere"),
    AttributeError("'NoneType' object has no attribute 'shape'"),
    RuntimeError("mat1 and mat2 shapes cannot be multiplied"),
    IndexError("list index out of range"),
    MemoryError(),
]
USER = [
    ValueError("steps must be >= 1, got 0."),
    ConfigError("volume_shape must be positive, got (0, 1, 1)."),
    NonFiniteError("The image autoencoder decoded NaN/Inf values ... Sample with dtype='bfloat16'."),
    FileNotFoundError("No model folder at 'x'."),
    PermissionError(errno.EACCES, "Permission denied", "out"),
    _chained(OSError("Cannot create output folders in 'o': ... Choose a writable --out."),
             NotADirectoryError(errno.ENOTDIR, "Not a directory")),
    OSError(errno.ENOSPC, "No space left on device"),
    ImportError("Previews need matplotlib: pip install 'duodiff[plot]'."),
    ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib"),
]


@pytest.mark.parametrize("exc", INTERNAL, ids=lambda e: type(e).__name__)
def test_internal_errors_exit_1_with_one_line_pointing_at_debug(exc, monkeypatch, capsys):
    code, err = _run_raising(exc, monkeypatch, capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert lines[0].startswith(f"duodiff info: internal error: {type(exc).__name__}") and "--debug" in lines[0]
    assert "Traceback" not in err and not is_user_error(exc)


@pytest.mark.parametrize("exc", USER, ids=lambda e: type(e).__name__)
def test_user_errors_exit_2_with_one_line(exc, monkeypatch, capsys):
    code, err = _run_raising(exc, monkeypatch, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("duodiff info: error: ") and "internal" not in lines[0]
    assert str(exc).splitlines()[0] in lines[0] and is_user_error(exc)


@pytest.mark.parametrize("where", ["first", "last"])
def test_debug_reraises_internal_errors(where, monkeypatch, capsys):
    def run(args):
        raise KeyError("label_unet")

    monkeypatch.setattr(info, "run", run)
    argv = ["--debug", "info", "m"] if where == "first" else ["info", "m", "--debug"]
    with pytest.raises(KeyError, match="label_unet"):
        main(argv)


def test_debug_prints_the_traceback_of_an_internal_error_in_a_real_process():
    script = textwrap.dedent("""
        import sys
        from duodiff.cli import info
        from duodiff.cli.main import main

        def run(args):
            return {}["missing_key"]  # a bug inside a sub-command

        info.run = run
        sys.exit(main(sys.argv[1:]))
    """)
    plain = subprocess.run([sys.executable, "-c", script, "info", "m"], capture_output=True, text=True, timeout=300)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    assert plain.stderr.strip() == ("duodiff info: internal error: KeyError: missing_key (rerun with --debug to see "
                                    "the traceback; if it is a bug, please report it with that)")
    debug = subprocess.run([sys.executable, "-c", script, "info", "m", "--debug"], capture_output=True, text=True,
                           timeout=300)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert 'line 7, in run' in debug.stderr and "KeyError: 'missing_key'" in debug.stderr


def test_real_user_errors_keep_exit_2(tmp_path, capsys, tiny_model_dir):
    code = main(["info", str(tmp_path / "no-model")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("duodiff info: error:")
    code = main(["sample", "-m", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--class-volume", "a:1"])
    err = capsys.readouterr().err
    assert code == 2 and "NAME=ML" in err and len(err.strip().splitlines()) == 1


def test_a_bug_during_sampling_is_internal(tmp_path, capsys, tiny_model_dir, monkeypatch):
    from duodiff.output import DuoSample

    def broken_save(self, *a, **k):
        raise TypeError("save() got an unexpected keyword argument 'prefx'")

    monkeypatch.setattr(DuoSample, "save", broken_save)
    code = main(["sample", "-m", str(tiny_model_dir), "-n", "1", "--out", str(tmp_path / "o"), "--steps", "2",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and err.strip().splitlines()[-1].startswith("duodiff sample: internal error: TypeError")

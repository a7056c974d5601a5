"""`duodiff` itself: help, version, usage errors and --debug, in process and in subprocesses."""

from __future__ import annotations

import pytest

from tests.conftest import run_cli


def assert_one_line_error(proc, *fragments: str) -> str:
    """Exit code 2, exactly one stderr line, no traceback, and the line names the problem."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("duodiff")
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


# In-process calls of the same ``main()`` for cheap checks (a subprocess costs seconds of imports).
def call_main(argv, capsys) -> tuple[int, str, str]:
    from duodiff.cli.main import main

    try:
        code = main(argv)
    except SystemExit as e:  # argparse exits for --help, --version and usage errors
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_lists_the_core_commands(capsys):
    code, out, _ = call_main(["--help"], capsys)
    assert code == 0
    for cmd in ("sample", "info", "preview"):
        assert cmd in out


def test_version(capsys):
    import duodiff

    code, out, _ = call_main(["--version"], capsys)
    assert code == 0 and out.strip() == f"duodiff {duodiff.__version__}"


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["sample", "-m", "x"], "the following arguments are required: --out"),
        (["sample", "--out", "o", "-n", "many"], "argument -n/--num-samples: must be a positive integer, got 'many'"),
        (["sample", "--out", "o", "--scheduler", "euler"], "argument --scheduler: invalid choice: 'euler'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_usage_errors_are_one_line(argv, fragment, capsys):
    code, out, err = call_main(argv, capsys)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "--help" in lines[0], err


def test_debug_shows_the_traceback(tmp_path):
    proc = run_cli(["--debug", "sample", "-m", str(tmp_path / "no-model"), "--out", str(tmp_path / "o")])
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr
    assert "FileNotFoundError" in proc.stderr

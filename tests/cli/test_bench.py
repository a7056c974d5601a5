"""`duodiff bench`: a proper usage line, and what it needs when there is no source checkout (issue 17, point 7)."""

from __future__ import annotations

import pytest

from tests.cli.test_main import call_main


def test_bench_help_shows_a_proper_usage_line(capsys):
    code, out, _ = call_main(["bench", "--help"], capsys)
    assert code == 0
    assert out.startswith("usage: duodiff bench [-h]")


@pytest.fixture()
def no_checkout(tmp_path, monkeypatch):
    """duodiff as installed from a wheel: no benchmarks/ folder beside the package."""
    import duodiff.cli.bench as bench

    monkeypatch.setattr(bench, "_checkout_root", lambda: tmp_path)


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_bench_help_without_a_source_checkout_says_what_is_needed(no_checkout, capsys, flag):
    code, out, err = call_main(["bench", flag], capsys)
    assert code == 0 and err == ""
    assert out.startswith("usage: duodiff bench [-h]") and "--threads" in out
    assert "source checkout" in out and "pip install -e ." in out


def test_bench_without_a_source_checkout_is_a_one_line_typed_error(no_checkout, capsys):
    from duodiff.cli.bench import SourceCheckoutError, script_path

    with pytest.raises(SourceCheckoutError) as info:
        script_path()
    assert isinstance(info.value, FileNotFoundError)
    code, _, err = call_main(["bench", "--threads", "1", "--quick"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("duodiff bench: error: benchmarks/bench_sampling.py not found"), lines[0]
    assert "source checkout" in lines[0]
    code, _, err = call_main(["bench", "--threads", "0"], capsys)  # the option is still checked first
    assert code == 2 and "positive integer" in err

"""`duodiff preview`: a montage of a sampled folder; it creates no folders (issue 17, point 5)."""

from __future__ import annotations

from tests.cli.test_main import call_main
from tests.cli.test_sample import assert_error
from tests.conftest import run_cli


def test_preview_creates_no_folders(real_dir, tmp_path, capsys):
    target = tmp_path / "missing" / "deeper" / "m.png"
    code, _, err = call_main(["preview", str(real_dir), "--out", str(target)], capsys)
    assert_error(code, err, "does not exist", "does not create folders")
    assert not (tmp_path / "missing").exists()
    code, _, err = call_main(["preview", str(real_dir), "--out", str(tmp_path), "--max-cases", "1"], capsys)
    assert code == 0, err
    assert (tmp_path / "preview.png").is_file() and str(tmp_path / "preview.png") in err


def test_preview_command(sampled, tmp_path):
    out, _ = sampled
    png = tmp_path / "montage.png"
    proc = run_cli(["preview", str(out), "--out", str(png), "--max-cases", "2"])
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""`duodiff preview` creates no folders (issue 17, point 5)."""

from __future__ import annotations

from tests.cli.test_main import call_main
from tests.cli.test_sample import assert_error


def test_preview_creates_no_folders(real_dir, tmp_path, capsys):
    target = tmp_path / "missing" / "deeper" / "m.png"
    code, _, err = call_main(["preview", str(real_dir), "--out", str(target)], capsys)
    assert_error(code, err, "does not exist", "does not create folders")
    assert not (tmp_path / "missing").exists()
    code, _, err = call_main(["preview", str(real_dir), "--out", str(tmp_path), "--max-cases", "1"], capsys)
    assert code == 0, err
    assert (tmp_path / "preview.png").is_file() and str(tmp_path / "preview.png") in err

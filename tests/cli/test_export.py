"""`duodiff export nnunet --out ""` is an error and its dataset folder gets the umask's permissions (issue 17,
point 5)."""

from __future__ import annotations

import os
import stat

import pytest

from tests.cli.test_main import call_main
from tests.cli.test_sample import assert_error


def test_export_empty_out_is_an_error(real_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = call_main(["export", "nnunet", "--real", str(real_dir), "--dataset-id", "7", "--name", "X",
                              "--out", ""], capsys)
    assert_error(code, err, "--out is empty")
    assert list(tmp_path.iterdir()) == []
    from duodiff.export import export_nnunet

    with pytest.raises(ValueError, match="empty"):
        export_nnunet("", dataset_id=7, name="X", real=real_dir)


def test_export_folder_has_umask_permissions(real_dir, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        code, _, err = call_main(["export", "nnunet", "--real", str(real_dir), "--dataset-id", "7", "--name", "X",
                                  "--out", str(tmp_path / "raw"), "--no-progress"], capsys)
    finally:
        os.umask(old)
    assert code == 0, err
    assert stat.S_IMODE((tmp_path / "raw" / "Dataset007_X").stat().st_mode) == 0o755

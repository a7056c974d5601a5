"""`duodiff export nnunet`: real and synthetic cases end to end, `--out ""` is an error and the dataset folder gets
the umask's permissions (issue 17, point 5)."""

from __future__ import annotations

import os
import stat

import pytest

from duodiff.export import export_nnunet
from tests.cli.test_main import call_main
from tests.cli.test_sample import assert_error
from tests.conftest import run_cli
from tests.test_export import check_nnunet_layout


def test_export_empty_out_is_an_error(real_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = call_main(["export", "nnunet", "--real", str(real_dir), "--dataset-id", "7", "--name", "X",
                              "--out", ""], capsys)
    assert_error(code, err, "--out is empty")
    assert list(tmp_path.iterdir()) == []

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


def test_cli_export_nnunet(real_dir, tiny_model_dir, tmp_path):
    args = ["export", "nnunet", "--real", str(real_dir), "--synthetic", str(tiny_model_dir), "-n", "2",
            "--dataset-id", "501", "--name", "HippoSynth", "--out", str(tmp_path), "--steps", "2", "--no-progress"]
    r = run_cli(args)
    assert r.returncode == 0, r.stderr
    assert "3 real + 2 synthetic" in r.stderr and "nnUNetv2_plan_and_preprocess -d 501" in r.stderr
    check_nnunet_layout(tmp_path / "Dataset501_HippoSynth", [f"hippo_{i:03d}" for i in range(3)]
                        + ["duodiff_s0000000000", "duodiff_s0000000001"])
    again = run_cli(args)
    assert again.returncode == 2 and "already exists" in again.stderr and "--overwrite" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1


def test_export_refuses_a_sampler_that_does_not_fit_the_model_before_writing(real_dir, tiny_model_dir, tmp_path,
                                                                             capsys):
    out = tmp_path / "raw"
    code, _, err = call_main(["export", "nnunet", "--real", str(real_dir), "--synthetic", str(tiny_model_dir),
                              "-n", "1", "--steps", "2", "--scheduler", "rflow", "--dataset-id", "5", "--name", "X",
                              "--out", str(out),
                              "--no-progress"], capsys)
    assert_error(code, err, "scheduler='rflow' cannot sample a model trained with prediction_type='epsilon'")
    assert not out.exists()

"""Outputs in announced places and sampling arguments checked up front (issue 17, points 5 and 6): `duodiff
sample` says where its preview went and refuses bad arguments before loading a model or creating --out;
`--preview DIR` writes DIR/preview.png; `duodiff preview` creates no folders; `duodiff export nnunet --out ""`
is an error and its dataset folder gets the umask's permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from test_cli import call_main
from test_export import make_msd

NO_MODEL = "/nonexistent/duodiff-model"  # loading it would fail: errors below come before the model loads


def assert_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.mark.parametrize("extra, message", [
    (["--guidance-scale", "-1"], "--guidance-scale must be >= 0"),
    (["--volume-tolerance", "0.1"], "--volume-tolerance needs --class-volume"),
    (["--class-volume", "a=1", "--volume-tolerance", "0"], "--volume-tolerance needs --class-volume and a value > 0"),
    (["--max-retries", "-1"], "--max-retries must be >= 0"),
    (["--qc-threshold", "1.5"], "--qc-threshold is a Dice in [0, 1]"),
    (["--seed", "-3"], "--seed must be >= 0"),
    (["--class-volume", "Anterior"], "--class-volume must look like NAME=ML"),
    (["--qc", "/nonexistent/seg"], "--qc '/nonexistent/seg' is not a folder"),
    (["--preview", "/nonexistent/dir/p.png"], "the folder '/nonexistent/dir' does not exist"),
])
def test_sample_checks_arguments_before_loading_the_model(tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    code, _, err = call_main(["sample", "-m", NO_MODEL, "--out", str(out), *extra], capsys)
    assert_error(code, err, "duodiff sample: error:", message)
    assert not out.exists()


def test_sample_empty_out_is_an_error(capsys):
    code, _, err = call_main(["sample", "-m", NO_MODEL, "--out", ""], capsys)
    assert_error(code, err, "--out is empty")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_sample_device_cuda_without_cuda(tmp_path, capsys):
    code, _, err = call_main(["sample", "-m", NO_MODEL, "--out", str(tmp_path / "o"), "--device", "cuda"], capsys)
    assert_error(code, err, "--device 'cuda': no usable CUDA GPU")
    code, _, err = call_main(["sample", "-m", NO_MODEL, "--out", str(tmp_path / "o"), "--device", "gpu0"], capsys)
    assert_error(code, err, "--device 'gpu0' is not a torch device")
    assert not (tmp_path / "o").exists()


def test_failed_sampling_leaves_no_empty_out_folder(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from duodiff.pipeline import DuoDiffusion

    def fail(self, *args, **kwargs):
        raise ValueError("refused by the model")

    monkeypatch.setattr(DuoDiffusion, "sample", fail)
    out = tmp_path / "new" / "out"
    code, _, err = call_main(["sample", "-m", str(tiny_model_dir), "--out", str(out), "--no-progress"], capsys)
    assert_error(code, err, "refused by the model")
    assert not out.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    code, _, err = call_main(["sample", "-m", str(tiny_model_dir), "--out", str(existing), "--no-progress"], capsys)
    assert code == 2 and existing.is_dir()  # a folder the user had is never removed


def test_sample_preview_into_existing_folder_is_announced(tiny_model_dir, tmp_path, capsys):
    out, previews = tmp_path / "synthetic", tmp_path / "previews"
    previews.mkdir()
    code, _, err = call_main(["sample", "-m", str(tiny_model_dir), "-n", "1", "--steps", "2", "--out", str(out),
                              "--no-progress", "--preview", str(previews)], capsys)
    assert code == 0, err
    png = previews / "preview.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert not Path(str(previews) + ".png").exists()
    assert f"wrote preview {png}" in err.splitlines()
    # the README's form: a preview inside the --out folder the command creates
    out2 = tmp_path / "synthetic2"
    code, _, err = call_main(["sample", "-m", str(tiny_model_dir), "-n", "1", "--steps", "2", "--out", str(out2),
                              "--no-progress", "--preview", str(out2 / "preview")], capsys)
    assert code == 0, err
    assert f"wrote preview {out2 / 'preview.png'}" in err.splitlines()


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory) -> Path:
    return make_msd(tmp_path_factory.mktemp("real") / "Task04_Hippocampus")


def test_preview_creates_no_folders(real_dir, tmp_path, capsys):
    target = tmp_path / "missing" / "deeper" / "m.png"
    code, _, err = call_main(["preview", str(real_dir), "--out", str(target)], capsys)
    assert_error(code, err, "does not exist", "does not create folders")
    assert not (tmp_path / "missing").exists()
    code, _, err = call_main(["preview", str(real_dir), "--out", str(tmp_path), "--max-cases", "1"], capsys)
    assert code == 0, err
    assert (tmp_path / "preview.png").is_file() and str(tmp_path / "preview.png") in err


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


def test_gitignore_covers_the_readme_sample_folder():
    root = Path(__file__).resolve().parents[1]
    assert "/synthetic/" in (root / ".gitignore").read_text().splitlines()

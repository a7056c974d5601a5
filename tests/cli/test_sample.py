"""`duodiff sample`: outputs in announced places and arguments checked up front (issue 17, points 5 and 6): it says
where its preview went and refuses bad arguments before loading a model or creating --out; `--preview DIR`
writes DIR/preview.png."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.cli.test_main import call_main

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


def test_gitignore_covers_the_readme_sample_folder():
    root = Path(__file__).resolve().parents[2]
    assert "/synthetic/" in (root / ".gitignore").read_text().splitlines()

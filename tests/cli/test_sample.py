"""`duodiff sample`: the pairs it writes (the real console script, in a subprocess), --resume, and (issue 17,
points 5 and 6) outputs in announced places and arguments checked up front: it says where its preview went and
refuses bad arguments before loading a model or creating --out; `--preview DIR` writes DIR/preview.png."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from duodiff.io import spacing_affine
from duodiff.output import sample_name
from tests.cli.test_main import assert_one_line_error, call_main
from tests.conftest import run_cli

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


SPACING = (1.5, 0.75, 2.0)


def test_sample_writes_readable_nifti(sampled, tiny_pipe):
    out, proc = sampled
    assert proc.stdout == ""
    # --no-progress: the only stderr output is the summary line
    assert proc.stderr.strip().splitlines() == [f"wrote 3 pair(s) to {out} (0 already there)"]
    expected = tiny_pipe.sample(3, seed=5, num_inference_steps=2, progress=False)
    for i, seed in enumerate((5, 6, 7)):
        name = sample_name(seed)
        img = nib.load(out / "imagesTr" / f"{name}_0000.nii.gz")
        lab = nib.load(out / "labelsTr" / f"{name}.nii.gz")
        assert img.get_data_dtype() == np.float32 and lab.get_data_dtype() == np.uint8
        assert img.shape == lab.shape == (16, 16, 16)
        for nii in (img, lab):
            np.testing.assert_allclose(nii.affine, spacing_affine(SPACING))
            np.testing.assert_allclose(np.diag(nii.affine)[:3], SPACING)
        img_data, lab_data = np.asarray(img.dataobj), np.asarray(lab.dataobj)
        assert 0.0 <= img_data.min() and img_data.max() <= 1.0
        assert set(np.unique(lab_data).tolist()) <= {0, 1, 2}
        # the CLI generates what the library generates for the same seeds (thread counts differ, so
        # convolutions may round differently in the last bits)
        torch.testing.assert_close(torch.from_numpy(img_data), expected.images[i, 0], atol=1e-4, rtol=0)
        assert (lab_data == expected.labels[i, 0].numpy()).mean() > 0.999


def test_sample_writes_dataset_json(sampled):
    out, _ = sampled
    meta = json.loads((out / "dataset.json").read_text())
    assert {"channel_names", "labels", "numTraining", "file_ending"} <= set(meta)
    assert meta["labels"] == {"background": 0, "anterior": 1, "posterior": 2}
    assert meta["numTraining"] == 3 and meta["file_ending"] == ".nii.gz"
    assert meta["channel_names"] == {"0": "MRI"}


def test_resume_skips_existing_seeds(sampled, tiny_model_dir, tmp_path):
    src, _ = sampled
    out = tmp_path / "synthetic"
    shutil.copytree(src, out)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "labelsTr").iterdir()}
    preview = tmp_path / "preview.png"
    proc = run_cli(["sample", "--model", str(tiny_model_dir), "-n", "5", "--out", str(out), "--steps", "2",
                    "--seed", "5", "--resume", "--no-progress", "--preview", str(preview), "--batch-size", "1"])
    assert proc.returncode == 0, proc.stderr
    assert "wrote 2 pair(s)" in proc.stderr and "(3 already there)" in proc.stderr
    after = {p.name: p.stat().st_mtime_ns for p in (out / "labelsTr").iterdir()}
    assert sorted(after) == [f"{sample_name(s)}.nii.gz" for s in range(5, 10)]
    assert all(after[k] == v for k, v in before.items())  # old cases untouched
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 5
    assert preview.read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------ bad input
def test_missing_model(tmp_path):
    proc = run_cli(["sample", "-m", str(tmp_path / "no-model"), "-n", "1", "--out", str(tmp_path / "o"),
                    "--no-progress"], script=True)
    assert_one_line_error(proc, "duodiff sample: error:", "No model folder at", "save_pretrained")
    assert not (tmp_path / "o").exists()


def test_steps_zero(tiny_model_dir, tmp_path):
    proc = run_cli(["sample", "-m", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--steps", "0"])
    assert_one_line_error(proc, "--steps", "must be a positive integer, got 0", "--help")


def test_out_under_a_file_is_unwritable(tiny_model_dir, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    proc = run_cli(["sample", "-m", str(tiny_model_dir), "-n", "1", "--out", str(blocker / "sub"), "--steps", "2",
                    "--no-progress"])
    assert_one_line_error(proc, "duodiff sample: error:", "Cannot create output folders", "writable --out")
    assert blocker.read_text() == "x"


def test_out_is_a_file(tiny_model_dir, tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    code, out, err = call_main(["sample", "-m", str(tiny_model_dir), "-n", "1", "--out", str(blocker),
                                "--no-progress"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "is not a folder" in err and blocker.read_text() == "x"


def test_sampler_that_does_not_fit_the_model_is_refused_before_any_output(tiny_model_dir, tmp_path, capsys):
    """--scheduler rflow on a noise-schedule model: one line, exit 2, after loading the model but before the
    'generating' line, the progress bar or the --out folder."""
    out = tmp_path / "o"
    code, _, err = call_main(["sample", "-m", str(tiny_model_dir), "-n", "1", "--steps", "2", "--scheduler", "rflow",
                              "--out", str(out), "--no-progress"], capsys)
    assert_error(code, err, "scheduler='rflow' cannot sample a model trained with prediction_type='epsilon'",
                 "use 'ddim' (or leave it unset)")
    assert not out.exists()

"""The real ``duodiff`` command line, run in subprocesses (console script and ``python -m``)."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from duodiff.io import spacing_affine
from duodiff.output import sample_name
from tests.conftest import run_cli

SPACING = (1.5, 0.75, 2.0)


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


@pytest.fixture(scope="module")
def sampled(tiny_model_dir, tmp_path_factory):
    """``duodiff sample`` run once through the installed console script."""
    out = tmp_path_factory.mktemp("cli") / "synthetic"
    proc = run_cli(["sample", "-m", str(tiny_model_dir), "-n", "3", "--out", str(out), "--steps", "2", "--seed",
                    "5", "--no-progress"], script=True)
    assert proc.returncode == 0, proc.stderr
    return out, proc


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


def test_info(tiny_model_dir):
    proc = run_cli(["info", str(tiny_model_dir)])
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "volume_shape   (16, 16, 16) voxels" in text
    assert "spacing        (1.5, 0.75, 2.0) mm" in text
    assert "0=background, 1=anterior, 2=posterior" in text
    for name, cls in [("label_autoencoder", "AutoencoderKL"), ("label_unet", "DiffusionModelUNet"),
                      ("image_controlnet", "ControlNet")]:
        assert any(line.startswith(name) and cls in line and "parameters" in line for line in text.splitlines())
    assert "total" in text


def test_preview_command(sampled, tmp_path):
    out, _ = sampled
    png = tmp_path / "montage.png"
    proc = run_cli(["preview", str(out), "--out", str(png), "--max-cases", "2"])
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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


# ------------------------------------------------------------------ bad input
def test_missing_model(tmp_path):
    proc = run_cli(["sample", "-m", str(tmp_path / "no-model"), "-n", "1", "--out", str(tmp_path / "o"),
                    "--no-progress"], script=True)
    assert_one_line_error(proc, "duodiff sample: error:", "No model folder at", "save_pretrained")
    assert not (tmp_path / "o").exists()


def test_steps_zero(tiny_model_dir, tmp_path):
    proc = run_cli(["sample", "-m", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--steps", "0"])
    assert_one_line_error(proc, "--steps", "must be a positive integer, got 0", "--help")


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


def test_corrupt_model_is_a_one_line_error(tiny_model_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "image_unet" / "model.safetensors").write_bytes(b"not weights")
    code, out, err = call_main(["info", str(broken)], capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("duodiff info: error:") and "not a valid safetensors file" in err


def test_debug_shows_the_traceback(tmp_path):
    proc = run_cli(["--debug", "sample", "-m", str(tmp_path / "no-model"), "--out", str(tmp_path / "o")])
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr
    assert "FileNotFoundError" in proc.stderr

"""The `duodiff evaluate` command end to end, and its one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from duodiff.cli.main import main
from duodiff.io import spacing_affine, write_nifti
from duodiff.testing import phantom_pair, tiny_pipeline
from tests.conftest import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def _write_folder(root: Path, seeds, shape=(18, 20, 17)) -> Path:
    for s in seeds:
        img, lab = phantom_pair(shape, num_classes=3, seed=s)
        write_nifti(root / "imagesTr" / f"case_{s:03d}_0000.nii.gz", img, spacing_affine((1, 1, 1)))
        write_nifti(root / "labelsTr" / f"case_{s:03d}.nii.gz", lab, spacing_affine((1, 1, 1)))
    return root


def test_cli_evaluate_end_to_end(tmp_path):
    """The real command in a subprocess: tiny model vs a folder of phantom pairs; segmenter trained here."""
    model = tmp_path / "model"
    tiny_pipeline().save_pretrained(model)
    real = _write_folder(tmp_path / "real", range(6))
    out = tmp_path / "out"
    proc = run_cli(["evaluate", "--model", str(model), "--real", str(real), "-n", "4", "--steps", "2",
                    "--segmenter-steps", "3", "--detector-steps", "2", "--detector-folds", "2",
                    "--out", str(out), "--cases", "case_000,case_001,case_002,case_003",
                    "--save-synthetic", "--no-progress"])
    assert proc.returncode == 0, proc.stderr
    for name in ("report.json", "report.md", "montage.png", "label_volumes.png", "memorization.png",
                 "segmenter.safetensors", "segmenter.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert report["setup"]["num_real"] == 4 and report["setup"]["num_synthetic"] == 4
    assert report["setup"]["synthetic_source"] == "generated"
    assert "percentile" in report["setup"]["preprocessing"]
    assert report["fid_2p5d"]["mean"] >= 0 and "real_split_half" in report["fid_2p5d"]
    assert set(report["pair_consistency"]) == {"synthetic", "real_heldout"}
    assert len(list((out / "synthetic" / "labelsTr").glob("*.nii.gz"))) == 4
    assert "FID-2.5D" in proc.stderr and "detectability ROC AUC" in proc.stderr and "PSNR" in proc.stderr
    assert report["detectability"]["num_folds"] == 2 and report["detectability"]["num_steps"] == 2
    assert report["autoencoder_fidelity"]["image"]["num_cases"] == 4
    assert set(report["autoencoder_fidelity"]["label"]["dice"]) == {"class_1", "class_2"}

    # reuse the saved segmenter on the saved synthetic folder, in-process, without a model
    out2 = tmp_path / "out2"
    code = main(["evaluate", "--synthetic", str(out / "synthetic"), "--real", str(real), "--segmenter", str(out),
                 "--detector-steps", "0", "--out", str(out2), "--no-progress"])
    assert code == 0
    again = json.loads((out2 / "report.json").read_text())
    assert again["setup"]["segmenter"]["trained_here"] is False
    assert again["setup"]["num_real"] == 6
    assert not (out2 / "segmenter.safetensors").exists()
    assert again["detectability"] is None and again["autoencoder_fidelity"] is None  # skipped; no model


def test_cli_evaluate_bad_input(tmp_path, capsys):
    real = _write_folder(tmp_path / "real", range(2))
    assert main(["evaluate", "--synthetic", str(tmp_path / "missing"), "--real", str(real),
                 "--out", str(tmp_path / "o")]) == 2
    assert "missing' does not exist" in capsys.readouterr().err
    assert main(["evaluate", "--synthetic", str(real), "--real", str(real), "--out", str(tmp_path / "o")]) == 2
    assert "--normalize-synthetic" in capsys.readouterr().err
    assert main(["evaluate", "--synthetic", str(real), "--real", str(real), "--cases", "nope",
                 "--normalize-synthetic", "--out", str(tmp_path / "o")]) == 2
    assert "nope" in capsys.readouterr().err

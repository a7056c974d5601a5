"""`duodiff info`: the model summary, and a corrupt model as a one-line error."""

from __future__ import annotations

import shutil

from tests.cli.test_main import call_main
from tests.conftest import run_cli


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


def test_corrupt_model_is_a_one_line_error(tiny_model_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "image_unet" / "model.safetensors").write_bytes(b"not weights")
    code, out, err = call_main(["info", str(broken)], capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("duodiff info: error:") and "not a valid safetensors file" in err

"""`duodiff train` tells the user what it did (issue 17, points 4, 5 and 7): a data summary, loud warnings (or a
failure) when the crop cuts away label foreground, "nothing to do" / "stopped at step N", no stray MONAI INFO
line, and one-line errors for a config folder, a missing dataset.json and an unusable --device."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from duodiff.config import ConfigError
from duodiff.train import TrainConfig
from duodiff.train.data import BadCaseError, data_summary, foreground_loss_cases
from tests.cli.test_main import call_main
from tests.train.test_trainer import write_dataset

CROP = (8, 8, 8)  # smaller than the phantoms' foreground: about half of class 1 is cropped away


def write_config(tmp: Path, data: Path, *, shape=(16, 16, 16), steps: int = 2, **data_opts) -> Path:
    stage = f"steps = {steps}\nbatch_size = 2\nlr = 1e-3\nwarmup_steps = 0\nlog_every = 1\ncheckpoint_every = 1\n"
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in data_opts.items())
    toml = (f'output_dir = "{tmp / "run"}"\nprogress = false\n\n[data]\nroot = "{data}"\n{extra}\n'
            f'[model]\npreset = "tiny"\nvolume_shape = {list(shape)}\n\n'
            + "".join(f"[stages.{s}]\n{stage}\n" for s in ("label_autoencoder", "image_autoencoder", "image_unet",
                                                             "image_controlnet", "label_unet")))
    path = tmp / "train.toml"
    path.write_text(toml)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "Dataset", n=3)


# ---------------------------------------------------------------- point 4: data summary, foreground loss
def test_config_validates_the_foreground_options():
    TrainConfig.from_dict({"data": {"root": "x", "max_foreground_loss": 0.0, "on_foreground_loss": "fail"}})
    with pytest.raises(ConfigError, match="max_foreground_loss"):
        TrainConfig.from_dict({"data": {"root": "x", "max_foreground_loss": 5}})
    with pytest.raises(ConfigError, match="on_foreground_loss must be 'warn' or 'fail'"):
        TrainConfig.from_dict({"data": {"root": "x", "on_foreground_loss": "skip"}})


def test_summary_and_loss_helpers():
    report = {"num_train": 2, "num_val": 0, "skipped": {},
              "cases": {"a": {"shape": [20, 20, 20], "spacing": [1, 1, 2], "lost_foreground": 0.6,
                              "foreground_kept": {"1": 0.4, "2": 0.5}},
                        "b": {"shape": [22, 20, 20], "spacing": [1, 1, 2], "lost_foreground": 0.01,
                              "foreground_kept": {"1": 1.0, "2": 0.98}}}}
    lines = data_summary(report, (16, 16, 16), ("background", "anterior", "posterior"))
    text = "\n".join(lines)
    assert "2 training + 0 validation" in text and "16x16x16" in text and "20x20x20 .. 22x20x20" in text
    assert "spacing 1x1x2 mm" in text
    assert "anterior 70% (worst 40%)" in text and "posterior 74% (worst 50%)" in text
    assert foreground_loss_cases(report, 0.05) == {"a": 0.6}
    assert foreground_loss_cases(report, 0.0) == {"a": 0.6, "b": 0.01}


def test_train_prints_summary_and_warns_per_damaged_case(data, tmp_path, capsys):
    cfg = write_config(tmp_path, data, shape=CROP)
    code, out, err = call_main(["train", str(cfg), "--stage", "label_autoencoder", "--stop-after", "1"], capsys)
    assert code == 0, err
    assert "data: 3 training + 0 validation case(s); cropped/padded to 8x8x8 voxels" in err
    assert "data: label foreground kept after crop/pad, mean over cases: outer" in err
    assert "WARNING: 3 of 3 case(s) lose more than 5% of their label foreground" in err
    for name in ("case_000", "case_001", "case_002"):
        assert f"WARNING: case {name}: " in err
    report = json.loads((tmp_path / "run" / "logs" / "data_report.json").read_text())
    assert set(report["cases"]["case_000"]["foreground_kept"]) == {"1", "2"}


def test_no_warning_when_the_crop_keeps_the_foreground(data, tmp_path, capsys):
    cfg = write_config(tmp_path, data)
    code, _, err = call_main(["train", str(cfg), "--stage", "label_autoencoder", "--stop-after", "1"], capsys)
    assert code == 0, err
    assert "data: 3 training" in err and "WARNING" not in err


def test_on_foreground_loss_fail_refuses_to_train(data, tmp_path, capsys):
    cfg = write_config(tmp_path, data, shape=CROP, on_foreground_loss="fail", max_foreground_loss=0.1)
    code, _, err = call_main(["train", str(cfg), "--stage", "label_autoencoder"], capsys)
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("duodiff train: error: 3 of 3 case(s) lose more than 10% of their label foreground")
    assert "on_foreground_loss = 'warn'" in line
    assert not (tmp_path / "run" / "checkpoints").exists()
    with pytest.raises(BadCaseError):  # the library raises the same error
        from duodiff.train import load_train_config, train

        train(load_train_config(cfg), stages=["label_autoencoder"])


# ---------------------------------------------------------------- point 7: quiet commands
def test_stop_after_and_resume_say_what_happened(data, tmp_path, capsys):
    cfg = write_config(tmp_path, data, steps=2)
    code, _, err = call_main(["train", str(cfg), "--stage", "label_autoencoder", "--stop-after", "1"], capsys)
    assert code == 0, err
    assert (f"stopped at step 1 of 2 of stage label_autoencoder (--stop-after); continue with `duodiff train {cfg} "
            "--resume`") in err
    code, _, err = call_main(["train", str(cfg), "--stage", "label_autoencoder", "--resume"], capsys)
    assert code == 0, err
    assert "model written to" in err and "nothing to do" not in err
    code, _, err = call_main(["train", str(cfg), "--stage", "label_autoencoder", "--resume"], capsys)
    assert code == 0, err
    assert "nothing to do: stage(s) label_autoencoder already finished" in err


def test_controlnet_init_does_not_log_monai_info(data, tmp_path, capsys):
    from duodiff.train import load_train_config
    from duodiff.train.trainer import Trainer

    cfg = load_train_config(write_config(tmp_path, data, steps=1))
    Trainer(cfg).run(["image_autoencoder", "image_unet"])
    capsys.readouterr()
    Trainer(cfg).run(["image_controlnet"])
    out, err = capsys.readouterr()
    assert "model updated" not in out + err
    assert logging.getLogger("monai.networks.utils").level == logging.INFO  # restored


# ---------------------------------------------------------------- point 5: errors that point the right way
def test_config_folder_points_at_the_templates(tmp_path, capsys):
    (tmp_path / "mine.toml").write_text("")
    code, _, err = call_main(["train", str(tmp_path)], capsys)
    assert code == 2
    assert "is a folder; pass a TOML training config file (mine.toml are there)" in err
    assert "examples/*/train.toml" in err and "See examples/*.toml" not in err
    code, _, err = call_main(["train", str(tmp_path / "nope.toml")], capsys)
    assert code == 2 and "examples/*/train.toml" in err


def test_missing_dataset_json_names_the_file(data, tmp_path, capsys):
    import shutil

    root = tmp_path / "Dataset"
    shutil.copytree(data, root)
    (root / "dataset.json").unlink()
    code, _, err = call_main(["train", str(write_config(tmp_path, root))], capsys)
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert f"{str(root / 'dataset.json')!r} does not exist" in line
    assert "'labels'" in line and "label_values" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_device_cuda_without_cuda_is_one_line(data, tmp_path, capsys):
    code, out, err = call_main(["train", str(write_config(tmp_path, data)), "--device", "cuda"], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("duodiff train: error: --device 'cuda': no usable CUDA GPU")
    assert not (tmp_path / "run").exists()

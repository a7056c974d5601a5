"""`duodiff convert`: old-format checkpoints to a duodiff folder, and --overwrite."""

from __future__ import annotations

from pathlib import Path

from duodiff import DuoDiffusion
from duodiff.cli.main import main
from tests.convert.test_importing import TOL, compare, parity_config, save_old


# ------------------------------------------------------------------------------------------ CLI
def _cli_args(paths: dict[str, Path], config: Path, out: Path) -> list[str]:
    args = ["convert", "--config", str(config), "--out", str(out)]
    for name, p in paths.items():
        args += [f"--{name.replace('_', '-')}", str(p)]
    return args


def test_cli_convert(tmp_path, capsys):
    config = parity_config()
    olds, paths = save_old(config, tmp_path / "old")
    cfg_file = tmp_path / "config.json"
    cfg_file.write_text(__import__("json").dumps(config.to_dict()))
    assert main(_cli_args(paths, cfg_file, tmp_path / "model")) == 0
    out = capsys.readouterr()
    assert "image_controlnet: monai-generative format, include_fc=False" in out.out
    pipe = DuoDiffusion.from_pretrained(tmp_path / "model")
    assert compare("image_controlnet", olds["image_controlnet"], pipe.image_controlnet, config) <= TOL
    # a second run into the same folder refuses (exit 2, one line) unless --overwrite
    assert main(_cli_args(paths, cfg_file, tmp_path / "model")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not empty" in err[0] and "--overwrite" in err[0]
    assert main([*_cli_args(paths, cfg_file, tmp_path / "model"), "--overwrite"]) == 0

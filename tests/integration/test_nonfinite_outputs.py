"""Non-finite outputs (issue 14, fault 6; case06): NaN/Inf volumes raise a typed error and are never written."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from duodiff import DuoSample
from duodiff.io import NonFiniteError, spacing_affine, write_nifti
from duodiff.testing import tiny_pipeline

COMMON = dict(seed=0, num_inference_steps=2, progress=False)


def _scale_first_conv(autoencoder: torch.nn.Module, factor: float) -> None:
    conv = [m for m in autoencoder.decoder.modules() if isinstance(m, torch.nn.Conv3d)][0]
    with torch.no_grad():
        conv.weight.mul_(factor)
        conv.bias.mul_(factor)


@pytest.fixture(scope="module")
def overflowing():
    """case06: the image decoder's activations exceed float16's range (65504); float32 stays finite."""
    pipe = tiny_pipeline()
    _scale_first_conv(pipe.image_autoencoder, 3e4)
    return pipe


def test_fp16_overflow_raises_naming_the_dtype_and_the_fix(overflowing):
    ok = overflowing.sample(2, **COMMON)
    assert torch.isfinite(ok.images).all()
    with pytest.raises(NonFiniteError) as info:
        overflowing.sample(2, dtype="float16", **COMMON)
    msg = str(info.value)
    assert "image autoencoder" in msg and "dtype=float16" in msg and "bfloat16" in msg and "seeds [0, 1]" in msg
    assert isinstance(info.value, ValueError)  # a typed error, still a ValueError for old handlers


def test_generate_images_checks_its_output(overflowing):
    labels = torch.zeros((1, 1, 16, 16, 16), dtype=torch.long)
    with pytest.raises(NonFiniteError, match="dtype=float16"):
        overflowing.generate_images(labels, dtype="float16", **COMMON)


def test_label_stage_checks_logits_before_argmax(tiny_pipe):
    """argmax turns NaN logits into ordinary-looking labels: the logits are checked, in both stage-1 entry points."""
    pipe = copy.deepcopy(tiny_pipe)
    _scale_first_conv(pipe.label_autoencoder, float("nan"))
    with pytest.raises(NonFiniteError, match="label autoencoder.*dtype=float32.*weights"):
        pipe.sample_labels(1, **COMMON)
    with pytest.raises(NonFiniteError, match="label autoencoder"):
        pipe.sample(1, **COMMON)


def test_inf_is_not_hidden_by_the_clamp(tiny_pipe):
    pipe = copy.deepcopy(tiny_pipe)
    last = [m for m in pipe.image_autoencoder.decoder.modules() if isinstance(m, torch.nn.Conv3d)][-1]
    with torch.no_grad():
        last.bias.fill_(float("inf"))
    with pytest.raises(NonFiniteError, match="image autoencoder"):
        pipe.sample(1, **COMMON)


def _sample(images: torch.Tensor, seeds=(0, 1)) -> DuoSample:
    n = images.shape[0]
    return DuoSample(images=images, labels=torch.zeros((n, 1, *images.shape[2:]), dtype=torch.long),
                     affine=spacing_affine((1, 1, 1)), spacing=(1.0, 1.0, 1.0), label_names=("bg", "fg"),
                     seeds=list(seeds))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_save_refuses_nonfinite_volumes_and_keeps_the_folder(tmp_path, bad):
    good = _sample(torch.rand((2, 1, 4, 4, 4)))
    good.save(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    images = torch.rand((2, 1, 4, 4, 4))
    images[1, 0, 1, 2, 3] = bad
    with pytest.raises(NonFiniteError, match=r"1 of 2 images.*seeds \[1\].*nothing was written"):
        _sample(images).save(tmp_path)  # same case names: would clobber the good files
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_save_into_a_new_folder_creates_nothing(tmp_path):
    images = torch.full((1, 1, 4, 4, 4), float("nan"))
    with pytest.raises(NonFiniteError):
        _sample(images, seeds=(5,)).save(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_case06_saved_pairs_are_never_unreadable(overflowing, tmp_path):
    """case06's end: the pairs that do come out (float32) save and read back; float16 never reaches the disk."""
    from duodiff import SyntheticPairDataset

    with pytest.raises(NonFiniteError):
        overflowing.sample(2, dtype="float16", **COMMON).save(tmp_path)
    assert not any(tmp_path.rglob("*.nii.gz"))
    overflowing.sample(2, **COMMON).save(tmp_path)
    item = SyntheticPairDataset.from_folder(tmp_path)[0]
    assert torch.isfinite(torch.as_tensor(np.asarray(item["image"]))).all()


def test_write_nifti_keeps_writing_what_it_is_given(tmp_path):
    """The low-level writer stays usable for making broken test files; the checks live in the writers above it."""
    path = write_nifti(tmp_path / "x.nii.gz", np.full((2, 2, 2), np.nan, np.float32), spacing_affine((1, 1, 1)))
    assert path.exists()


def test_cli_float16_overflow_is_one_line_and_writes_nothing(overflowing, tmp_path, capsys):
    from duodiff.cli.main import main

    model = tmp_path / "model"
    overflowing.save_pretrained(model)
    out = tmp_path / "out"
    code = main(["sample", "-m", str(model), "-n", "2", "--out", str(out), "--steps", "2", "--no-progress",
                 "--dtype", "float16"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "dtype=float16" in err and "bfloat16" in err
    assert not any(out.rglob("*.nii.gz"))

"""DuoSample: NIfTI output in nnU-Net naming with correct affines and dtypes, dataset.json, MONAI dicts."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from duodiff import DuoSample
from duodiff.io import read_nifti, spacing_affine
from duodiff.output import sample_name

SPACING = (1.5, 0.75, 2.0)


@pytest.fixture(scope="module")
def out(tiny_pipe) -> DuoSample:
    return tiny_pipe.sample(2, seed=[3, 12345], num_inference_steps=2, progress=False)


def make_sample(n=2, channels=1, num_classes=3, shape=(8, 6, 4), seeds=None) -> DuoSample:
    g = torch.Generator().manual_seed(0)
    return DuoSample(
        images=torch.rand((n, channels, *shape), generator=g),
        labels=torch.randint(0, num_classes, (n, 1, *shape), generator=g),
        affine=spacing_affine(SPACING),
        spacing=SPACING,
        label_names=tuple(["background"] + [f"c{i}" for i in range(1, num_classes)]),
        seeds=list(seeds or range(n)),
    )


def test_sample_names():
    assert sample_name(7) == "duodiff_s0000000007"
    assert sample_name(7, "liver") == "liver_s0000000007"


def test_save_writes_nnunet_layout(out, tmp_path):
    names = out.save(tmp_path)
    assert names == ["duodiff_s0000000003", "duodiff_s0000012345"] == out.names()
    for i, name in enumerate(names):
        img_file = tmp_path / "imagesTr" / f"{name}_0000.nii.gz"
        lab_file = tmp_path / "labelsTr" / f"{name}.nii.gz"
        img, lab = nib.load(img_file), nib.load(lab_file)
        # dtypes on disk
        assert img.get_data_dtype() == np.float32
        assert lab.get_data_dtype() == np.uint8
        # affine: spacing on the diagonal, in both sform and qform
        for nii in (img, lab):
            np.testing.assert_allclose(nii.affine, spacing_affine(SPACING))
            np.testing.assert_allclose(nii.get_sform(), spacing_affine(SPACING))
            np.testing.assert_allclose(nii.get_qform(), spacing_affine(SPACING))
            assert nii.header.get_zooms() == pytest.approx(SPACING)
            assert nii.header.get_xyzt_units()[0] == "mm"
        # values round-trip exactly
        np.testing.assert_array_equal(np.asarray(img.dataobj), out.images[i, 0].numpy())
        np.testing.assert_array_equal(np.asarray(lab.dataobj), out.labels[i, 0].numpy().astype(np.uint8))
    # no temp files left behind
    assert sorted(p.name for p in tmp_path.rglob("*") if p.name.startswith(".")) == []


def test_dataset_json_has_nnunet_v2_keys(out, tmp_path):
    out.save(tmp_path)
    meta = json.loads((tmp_path / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "MRI"}
    assert meta["labels"] == {"background": 0, "anterior": 1, "posterior": 2}
    assert meta["numTraining"] == 2
    assert meta["file_ending"] == ".nii.gz"


def test_saving_more_cases_updates_the_count(tmp_path):
    make_sample(2, seeds=[0, 1]).save(tmp_path)
    make_sample(3, seeds=[2, 3, 4]).save(tmp_path)
    make_sample(1, seeds=[4]).save(tmp_path)  # overwrites seed 4
    assert json.loads((tmp_path / "dataset.json").read_text())["numTraining"] == 5
    assert len(list((tmp_path / "imagesTr").iterdir())) == 5


def test_multichannel_images_get_one_file_per_channel(tmp_path):
    s = make_sample(1, channels=2)
    s.save(tmp_path, channel_names=["T1", "T2"], prefix="case")
    files = sorted(p.name for p in (tmp_path / "imagesTr").iterdir())
    assert files == ["case_s0000000000_0000.nii.gz", "case_s0000000000_0001.nii.gz"]
    second, _ = read_nifti(tmp_path / "imagesTr" / files[1])
    np.testing.assert_array_equal(second, s.images[0, 1].numpy())
    assert json.loads((tmp_path / "dataset.json").read_text())["channel_names"] == {"0": "T1", "1": "T2"}


def test_many_classes_are_saved_as_int16(tmp_path):
    s = make_sample(1, num_classes=300)
    s.labels[0, 0, 0, 0, 0] = 299
    s.save(tmp_path)
    lab = nib.load(next((tmp_path / "labelsTr").iterdir()))
    assert lab.get_data_dtype() == np.int16
    assert int(np.asarray(lab.dataobj).max()) == 299


def test_unwritable_out_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="Cannot create output folders in .*writable"):
        make_sample(1).save(blocker / "out")


def test_to_dicts_gives_metatensors_with_the_affine(out):
    dicts = out.to_dicts()
    assert len(dicts) == 2
    d = dicts[1]
    assert set(d) == {"image", "label", "is_synthetic", "seed"}
    assert isinstance(d["image"], MetaTensor) and isinstance(d["label"], MetaTensor)
    assert d["image"].shape == (1, 16, 16, 16) and d["image"].dtype == torch.float32
    assert d["label"].shape == (1, 16, 16, 16) and d["label"].dtype == torch.int64
    np.testing.assert_allclose(d["image"].affine.numpy(), spacing_affine(SPACING))
    np.testing.assert_allclose(d["label"].affine.numpy(), spacing_affine(SPACING))
    assert tuple(d["image"].pixdim.tolist()) == pytest.approx(SPACING)
    assert d["is_synthetic"] is True and d["seed"] == 12345
    assert torch.equal(d["image"].as_tensor(), out.images[1])
    # each dict owns its affine
    dicts[0]["image"].affine[0, 0] = 99.0
    assert float(dicts[1]["image"].affine[0, 0]) == 1.5


def test_to_dicts_work_with_monai_transforms(out):
    from monai.transforms import Spacingd

    d = out.to_dicts()[0]
    resampled = Spacingd(keys=["image", "label"], pixdim=(3.0, 1.5, 4.0), mode=("bilinear", "nearest"))(d)
    assert tuple(resampled["image"].shape[1:]) == (8, 8, 8)
    assert set(torch.unique(resampled["label"]).tolist()) <= {0, 1, 2}


def test_len_and_repr(out):
    assert len(out) == 2
    assert "DuoSample(n=2" in repr(out) and "torch.int64" in repr(out)


def test_atomic_writes_get_normal_file_permissions(tmp_path):
    """Files written through a temp file + rename get the umask's permissions, not mkstemp's private 0600."""
    import os
    import stat

    from duodiff.io import atomic_write, write_nifti

    mask = os.umask(0)
    os.umask(mask)
    with atomic_write(tmp_path / "report.json") as tmp:
        tmp.write_text("{}")
    path = write_nifti(tmp_path / "x.nii.gz", np.zeros((2, 2, 2), np.float32), spacing_affine((1, 1, 1)))
    for f in (tmp_path / "report.json", path):
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, oct(f.stat().st_mode)

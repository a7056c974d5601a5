"""nnU-Net v2 export: layout, dataset.json, real cases kept byte for byte, synthetic from folder or model."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from duodiff.export import export_nnunet, find_cases, read_dataset_meta
from duodiff.io import read_nifti, write_json, write_nifti
from duodiff.testing import phantom_pair
from tests.conftest import DATA_ROOT

LABELS = ("background", "anterior", "posterior")  # the names of conftest's tiny_pipe


HIPPO = DATA_ROOT / "msd_hippocampus"


def make_msd(folder: Path, n: int = 3, *, shape=(12, 14, 10), msd_labels: bool = True) -> Path:
    """An MSD-layout folder: imagesTr/<case>.nii.gz, labelsTr/<case>.nii.gz, dataset.json (id -> name)."""
    for i in range(n):
        image, label = phantom_pair(shape, num_classes=3, seed=i)
        affine = np.array([[0, -1.2, 0, 10.0], [1.1, 0, 0, -4.0], [0, 0, 2.5, 7.0], [0, 0, 0, 1]])
        write_nifti(folder / "imagesTr" / f"hippo_{i:03d}.nii.gz", image, affine)
        write_nifti(folder / "labelsTr" / f"hippo_{i:03d}.nii.gz", label, affine)
    labels = {str(i): n for i, n in enumerate(LABELS)} if msd_labels else {n: i for i, n in enumerate(LABELS)}
    write_json(folder / "dataset.json", {"name": "toy", "modality": {"0": "MRI"}, "labels": labels})
    return folder


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory) -> Path:
    return make_msd(tmp_path_factory.mktemp("real"))


@pytest.fixture(scope="module")
def sample_dir(tiny_pipe, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("samples")
    tiny_pipe.sample(3, seed=40, num_inference_steps=2, progress=False).save(out)
    return out


def check_nnunet_layout(ds: Path, expected_cases: list[str], labels=LABELS, channels=("MRI",)) -> dict:
    meta = json.loads((ds / "dataset.json").read_text())
    assert meta["channel_names"] == {str(i): c for i, c in enumerate(channels)}
    assert meta["labels"] == {n: i for i, n in enumerate(labels)}
    assert meta["numTraining"] == len(expected_cases) and meta["file_ending"] == ".nii.gz"
    images = sorted(p.name for p in (ds / "imagesTr").iterdir())
    assert images == sorted(f"{c}_{k:04d}.nii.gz" for c in expected_cases for k in range(len(channels)))
    assert sorted(p.name for p in (ds / "labelsTr").iterdir()) == sorted(f"{c}.nii.gz" for c in expected_cases)
    for case in expected_cases:  # image and label on one grid, labels in range
        img = nib.load(ds / "imagesTr" / f"{case}_0000.nii.gz")
        lab = nib.load(ds / "labelsTr" / f"{case}.nii.gz")
        assert img.shape == lab.shape and np.allclose(img.affine, lab.affine)
        assert set(np.unique(np.asarray(lab.dataobj)).tolist()) <= set(range(len(labels)))
    return meta


def test_export_real_and_synthetic_folder(real_dir, sample_dir, tmp_path):
    res = export_nnunet(tmp_path, dataset_id=501, name="HippoSynth", real=real_dir, synthetic=sample_dir)
    ds = tmp_path / "Dataset501_HippoSynth"
    assert res.path == ds and res.real_cases == ["hippo_000", "hippo_001", "hippo_002"]
    assert res.synthetic_cases == [f"duodiff_s{s:010d}" for s in (40, 41, 42)]
    meta = check_nnunet_layout(ds, res.real_cases + res.synthetic_cases)
    assert meta["duodiff_synthetic_cases"] == res.synthetic_cases and meta["name"] == "HippoSynth"
    # real cases: same bytes (voxels, header, affine) under nnU-Net names
    assert (ds / "imagesTr/hippo_001_0000.nii.gz").read_bytes() == (real_dir / "imagesTr/hippo_001.nii.gz").read_bytes()
    assert (ds / "labelsTr/hippo_001.nii.gz").read_bytes() == (real_dir / "labelsTr/hippo_001.nii.gz").read_bytes()
    # synthetic cases: copied from the sample folder
    name = res.synthetic_cases[0]
    image = f"imagesTr/{name}_0000.nii.gz"
    assert (ds / image).read_bytes() == (sample_dir / image).read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_export_generates_from_a_model(real_dir, tiny_pipe, tiny_model_dir, tmp_path):
    res = export_nnunet(tmp_path, dataset_id=7, name="Gen", real=real_dir, synthetic=tiny_model_dir, num_synthetic=2,
                        seed=5, num_inference_steps=2, progress=False)
    check_nnunet_layout(res.path, res.real_cases + res.synthetic_cases)
    assert res.path.name == "Dataset007_Gen" and res.synthetic_cases == ["duodiff_s0000000005", "duodiff_s0000000006"]
    ref = tiny_pipe.sample(1, seed=6, num_inference_steps=2, progress=False)
    img, affine = read_nifti(res.path / "imagesTr/duodiff_s0000000006_0000.nii.gz")
    np.testing.assert_allclose(img, ref.images[0, 0].numpy(), atol=1e-4)  # made in a batch of 2: float noise
    np.testing.assert_allclose(affine, tiny_pipe.affine)


def test_export_synthetic_only_subset(sample_dir, tmp_path):
    res = export_nnunet(tmp_path, dataset_id=502, name="SynOnly", synthetic=sample_dir, num_synthetic=2)
    check_nnunet_layout(res.path, res.synthetic_cases)
    assert len(res.synthetic_cases) == 2 and res.real_cases == []


def test_msd_4d_and_uncompressed_inputs(tmp_path):
    real = tmp_path / "real"
    image, label = phantom_pair((8, 9, 10), seed=0)
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    write_nifti(real / "imagesTr" / "two.nii.gz", np.stack([image, image * 2], axis=-1), affine)
    (real / "labelsTr").mkdir()
    nib.save(nib.Nifti1Image(label, affine), str(real / "labelsTr" / "two.nii"))  # uncompressed
    write_json(real / "dataset.json", {"modality": {"0": "T1", "1": "T2"}, "labels": {"0": "bg", "1": "a", "2": "b"}})
    res = export_nnunet(tmp_path / "raw", dataset_id=3, name="Multi", real=real)
    check_nnunet_layout(res.path, ["two"], labels=("bg", "a", "b"), channels=("T1", "T2"))
    ch1, aff1 = read_nifti(res.path / "imagesTr/two_0001.nii.gz")
    np.testing.assert_allclose(ch1, image * 2, rtol=1e-6)
    np.testing.assert_allclose(aff1, affine)
    with gzip.open(res.path / "labelsTr/two.nii.gz") as f:
        assert f.read() == (real / "labelsTr/two.nii").read_bytes()


def test_label_names_must_agree(real_dir, tmp_path):
    other = make_msd(tmp_path / "other", n=1)
    write_json(other / "dataset.json", {"labels": {"background": 0, "left": 1, "right": 2}})
    (other / "labelsTr" / "hippo_000.nii.gz").rename(other / "labelsTr" / "syn_000.nii.gz")
    (other / "imagesTr" / "hippo_000.nii.gz").rename(other / "imagesTr" / "syn_000.nii.gz")
    with pytest.raises(ValueError, match=r"names \['background', 'anterior', 'posterior'\] differ.*--label-names"):
        export_nnunet(tmp_path / "raw", dataset_id=9, name="X", real=real_dir, synthetic=other)
    res = export_nnunet(tmp_path / "raw", dataset_id=9, name="X", real=real_dir, synthetic=other,
                        label_names=["background", "Anterior", "Posterior"])
    assert json.loads((res.path / "dataset.json").read_text())["labels"]["Posterior"] == 2
    with pytest.raises(ValueError, match="label_names has 2 names but the real data has 3 classes"):
        export_nnunet(tmp_path / "raw2", dataset_id=9, name="X", real=real_dir, label_names=["bg", "fg"])


def test_existing_dataset_and_id_clash(real_dir, tmp_path):
    export_nnunet(tmp_path, dataset_id=11, name="A", real=real_dir)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_nnunet(tmp_path, dataset_id=11, name="A", real=real_dir)
    with pytest.raises(ValueError, match=r"\['Dataset011_A'\] with dataset id 11"):
        export_nnunet(tmp_path, dataset_id=11, name="B", real=real_dir)
    res = export_nnunet(tmp_path, dataset_id=11, name="A", real=real_dir, overwrite=True)
    assert len(res.real_cases) == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["Dataset011_A"]


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        (dict(dataset_id=0, name="A"), ValueError, "dataset_id must be an int in 1..999"),
        (dict(dataset_id=1, name="bad name"), ValueError, "name must use letters"),
        (dict(dataset_id=1, name="A", real=None), ValueError, "Nothing to export"),
        (dict(dataset_id=1, name="A", num_synthetic=0), ValueError, "num_synthetic must be a positive int"),
    ],
)
def test_argument_errors(real_dir, tmp_path, kwargs, err, match):
    kw = dict(real=real_dir) | kwargs
    with pytest.raises(err, match=match):
        export_nnunet(tmp_path, **kw)


def test_model_needs_num_synthetic_and_folder_limits(tiny_model_dir, sample_dir, tmp_path):
    with pytest.raises(ValueError, match=r"needs num_synthetic \(-n N\)"):
        export_nnunet(tmp_path, dataset_id=1, name="A", synthetic=tiny_model_dir)
    with pytest.raises(ValueError, match="holds only 3 pairs"):
        export_nnunet(tmp_path, dataset_id=1, name="A", synthetic=sample_dir, num_synthetic=4)


def test_failed_export_leaves_nothing(real_dir, tmp_path):
    broken = make_msd(tmp_path / "broken", n=2)
    write_nifti(broken / "labelsTr" / "hippo_001.nii.gz", np.zeros((3, 3, 3), np.uint8), np.eye(4))
    with pytest.raises(ValueError, match="hippo_001.*same voxel grid"):
        export_nnunet(tmp_path / "raw", dataset_id=4, name="Broken", real=broken)
    assert list((tmp_path / "raw").iterdir()) == []


def test_find_cases_and_meta(real_dir, sample_dir):
    cases = find_cases(sample_dir)
    assert [c.name for c in cases] == [f"duodiff_s{s:010d}" for s in (40, 41, 42)]
    assert cases[0].images[0].name.endswith("_0000.nii.gz")
    assert read_dataset_meta(real_dir) == (LABELS, ("MRI",))
    assert read_dataset_meta(sample_dir) == (LABELS, ("MRI",))


@pytest.mark.data
@pytest.mark.skipif(not (HIPPO / "dataset.json").is_file(), reason="needs ../shared/data/msd_hippocampus")
def test_export_real_hippocampus(sample_dir, tmp_path):
    res = export_nnunet(tmp_path, dataset_id=501, name="HippoSynth", real=HIPPO, synthetic=sample_dir,
                        label_names=["background", "Anterior", "Posterior"])
    assert len(res.real_cases) == 200 and len(res.synthetic_cases) == 3
    meta = json.loads((res.path / "dataset.json").read_text())
    assert meta["numTraining"] == 203 and meta["labels"] == {"background": 0, "Anterior": 1, "Posterior": 2}
    src = HIPPO / "imagesTr" / "hippocampus_001.nii.gz"
    assert (res.path / "imagesTr" / "hippocampus_001_0000.nii.gz").read_bytes() == src.read_bytes()


def test_nnunet_verify_dataset_integrity(real_dir, sample_dir, tmp_path, monkeypatch):
    """nnU-Net's own check (optional: runs where nnunetv2 is installed)."""
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "res"))
    verify = pytest.importorskip("nnunetv2.experiment_planning.verify_dataset_integrity").verify_dataset_integrity
    res = export_nnunet(tmp_path, dataset_id=501, name="HippoSynth", real=real_dir, synthetic=sample_dir)
    verify(str(res.path), num_processes=1)  # raises on any problem

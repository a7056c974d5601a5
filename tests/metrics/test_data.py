"""Loading real pairs (layouts, case lists, crop/normalisation)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from duodiff.io import spacing_affine, write_nifti
from duodiff.metrics import load_pairs, parse_cases, read_label_names
from duodiff.testing import phantom_pair

pytestmark = pytest.mark.usefixtures("one_thread")


def _folder(root: Path, n: int, shape=(18, 20, 17), *, nnunet: bool = True, spacing=(1.0, 1.0, 1.0)) -> Path:
    for i in range(n):
        img, lab = phantom_pair(shape, num_classes=3, seed=i)
        suffix = "_0000" if nnunet else ""
        write_nifti(root / "imagesTr" / f"case_{i:03d}{suffix}.nii.gz", img, spacing_affine(spacing))
        write_nifti(root / "labelsTr" / f"case_{i:03d}.nii.gz", lab, spacing_affine(spacing))
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "outer", "2": "inner"}}))
    return root


@pytest.mark.parametrize("nnunet", [True, False])
def test_load_pairs_crop_and_normalise(tmp_path, nnunet):
    folder = _folder(tmp_path, 3, nnunet=nnunet)
    ps = load_pairs(folder, volume_shape=(16, 16, 16))
    assert ps.images.shape == (3, 1, 16, 16, 16) and ps.labels.shape == (3, 1, 16, 16, 16)
    assert ps.images.dtype == torch.float32 and ps.labels.dtype == torch.int64
    assert float(ps.images.min()) == 0.0 and float(ps.images.max()) == 1.0
    assert ps.names == ["case_000", "case_001", "case_002"]
    assert ps.spacing == (1.0, 1.0, 1.0)
    assert "percentile" in ps.info["preprocessing"]
    # the crop is centred on the foreground: its centroid sits near the middle of the window
    centroid = np.argwhere(ps.labels[0, 0].numpy() > 0).mean(0)
    np.testing.assert_allclose(centroid, [7.5, 7.5, 7.5], atol=1.0)
    # padding: a bigger window keeps every label voxel, and reports none lost
    big = load_pairs(folder, volume_shape=(24, 24, 24))
    assert big.info["label_voxels_lost"]["total"] == 0
    assert int((big.labels > 0).sum()) == sum(int((phantom_pair((18, 20, 17), num_classes=3, seed=i)[1] > 0).sum())
                                              for i in range(3))
    assert read_label_names(folder) == ("background", "outer", "inner")


def test_load_pairs_cases_and_errors(tmp_path):
    folder = _folder(tmp_path / "d", 3)
    ps = load_pairs(folder, volume_shape=(16, 16, 16), cases=["case_002", "case_000"])
    assert ps.names == ["case_002", "case_000"]
    with pytest.raises(ValueError, match="case_009"):
        load_pairs(folder, volume_shape=(16, 16, 16), cases=["case_009"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pairs(tmp_path / "nothing")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_pairs(folder, normalize=False)  # phantom intensities are ~0..1000
    odd = _folder(tmp_path / "odd", 1, shape=(17, 17, 17))
    (folder / "imagesTr" / "case_000_0000.nii.gz").replace(odd / "imagesTr" / "x_0000.nii.gz")
    (folder / "labelsTr" / "case_000.nii.gz").replace(odd / "labelsTr" / "x.nii.gz")
    with pytest.raises(ValueError, match="different shapes"):
        load_pairs(odd)


def test_parse_cases_forms(tmp_path):
    assert parse_cases(None) is None
    assert parse_cases("a, b,c") == ["a", "b", "c"]
    assert parse_cases(["x.nii.gz"]) == ["x"]
    txt = tmp_path / "test.txt"
    txt.write_text("# test split\ncase_1\ncase_2  # second\n")
    assert parse_cases(str(txt)) == ["case_1", "case_2"]
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["a"], "test": ["b", "c"]}))
    assert parse_cases(f"{split}:test") == ["b", "c"]
    with pytest.raises(ValueError, match="name one"):
        parse_cases(str(split))
    with pytest.raises(ValueError, match="no case list"):
        parse_cases(f"{split}:val")
    with pytest.raises(FileNotFoundError):
        parse_cases(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="empty"):
        parse_cases(",")

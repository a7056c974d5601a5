"""Training data: finding MSD / nnU-Net cases, preprocessing and its cache, bad cases, split files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from duodiff.io import spacing_affine, write_nifti
from duodiff.testing import phantom_pair
from duodiff.train.data import BadCaseError, find_cases, load_split_cases, prepare_dataset, preprocess_case
from tests.train.test_trainer import SHAPE, make_config, write_dataset


def test_find_cases_msd_and_nnunet(tmp_path):
    msd = find_cases(write_dataset(tmp_path / "msd", n=2))
    nn = find_cases(write_dataset(tmp_path / "nn", n=2, nnunet=True))
    assert [c.name for c in msd] == [c.name for c in nn] == ["case_000", "case_001"]
    assert nn[0].images[0].name == "case_000_0000.nii.gz"


def test_prepare_normalises_and_crops_around_foreground(dataset, tmp_path):
    cfg = make_config(tmp_path, dataset)
    data, values = prepare_dataset(cfg.data, SHAPE, cache_dir=tmp_path / "cache", progress=False)
    assert values == [0, 1, 2]
    assert data.images.shape == (4, 1, *SHAPE) and data.images.dtype == torch.float32
    assert data.labels.shape == (4, 1, *SHAPE) and data.labels.dtype == torch.uint8
    assert float(data.images.min()) >= 0.0 and float(data.images.max()) <= 1.0
    # per-volume normalisation removes the per-case scale (case i was multiplied by i + 1)
    assert abs(float(data.images[0].mean()) - float(data.images[3].mean())) < 0.1
    assert set(torch.unique(data.labels).tolist()) == {0, 1, 2}
    # cached: a second call reads the npz and gives the same arrays
    again, _ = prepare_dataset(cfg.data, SHAPE, cache_dir=tmp_path / "cache", progress=False)
    assert torch.equal(again.images, data.images) and again.names == data.names


def test_bad_cases_fail_or_skip_with_report(tmp_path):
    root = write_dataset(tmp_path / "d", n=3)
    aff = spacing_affine((1, 1, 1))
    img, _ = phantom_pair((18, 20, 17), seed=9)
    img[0, 0, 0] = np.nan
    write_nifti(root / "imagesTr" / "case_001.nii.gz", img, aff)  # NaN
    write_nifti(root / "labelsTr" / "case_002.nii.gz", np.zeros((18, 20, 17), np.uint8), aff)  # empty label
    cfg = make_config(tmp_path, root)
    with pytest.raises(BadCaseError, match="case_001.*NaN"):
        prepare_dataset(cfg.data, SHAPE, cache_dir=tmp_path / "c1", progress=False)
    skip = cfg.data.replace(on_bad_case="skip")
    data, _ = prepare_dataset(skip, SHAPE, cache_dir=tmp_path / "c2", progress=False)
    assert data.names == ["case_000"]
    assert set(data.report["skipped"]) == {"case_001", "case_002"}
    assert "empty" in data.report["skipped"]["case_002"]


def test_shape_mismatch_is_reported(tmp_path):
    root = write_dataset(tmp_path / "d", n=2)
    _, lab = phantom_pair((18, 20, 16), seed=1)
    write_nifti(root / "labelsTr" / "case_001.nii.gz", lab, spacing_affine((1, 1, 1)))
    cfg = make_config(tmp_path, root)
    with pytest.raises(BadCaseError, match=r"case_001.*image shape \(18, 20, 17\) != label shape \(18, 20, 16\)"):
        prepare_dataset(cfg.data, SHAPE, cache_dir=tmp_path / "c", progress=False)


def test_load_split_cases_matches_training_preprocessing(dataset, tmp_path):
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["case_000", "case_001"], "test": ["case_003", "case_002"]}))
    images, labels, names = load_split_cases(dataset, split, "test", SHAPE, 3)
    assert names == ["case_003", "case_002"]  # the split's order
    assert images.shape == (2, 1, *SHAPE) and images.dtype == torch.float32
    assert labels.shape == (2, 1, *SHAPE) and labels.dtype == torch.uint8
    cfg = make_config(tmp_path, dataset).data
    case = {c.name: c for c in find_cases(dataset)}["case_002"]
    img, lab, _ = preprocess_case(case, cfg, SHAPE, [0, 1, 2])
    assert np.array_equal(images[1].numpy(), img) and np.array_equal(labels[1].numpy(), lab)
    with pytest.raises(ValueError, match="no 'val' cases"):
        load_split_cases(dataset, split, "val", SHAPE, 3)
    split.write_text(json.dumps({"train": [], "test": ["case_404"]}))
    with pytest.raises(FileNotFoundError, match="case_404"):
        load_split_cases(dataset, split, "test", SHAPE, 3)

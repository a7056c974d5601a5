"""Detectability (cross-validated real-vs-synthetic AUC) on known inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from duodiff.metrics import (
    build_detector,
    detectability,
    stratified_folds,
)
from tests.metrics.test_autoencoder import _phantom_images

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ detectability
def test_stratified_folds_cover_each_kind_once():
    folds = stratified_folds(7, 10, 3, generator=torch.Generator().manual_seed(0))
    assert len(folds) == 3
    assert sorted(i for r, _ in folds for i in r) == list(range(7))
    assert sorted(i for _, s in folds for i in s) == list(range(10))
    assert all(len(r) in (2, 3) and len(s) in (3, 4) for r, s in folds)
    again = stratified_folds(7, 10, 3, generator=torch.Generator().manual_seed(0))
    assert again == folds
    with pytest.raises(ValueError, match="num_folds"):
        stratified_folds(7, 2, 3, generator=torch.Generator())
    with pytest.raises(ValueError, match="num_folds"):
        stratified_folds(7, 7, 1, generator=torch.Generator())


def test_detector_is_small_and_outputs_one_logit():
    net = build_detector((1, 32, 48, 32))
    assert sum(p.numel() for p in net.parameters()) < 100_000
    assert net(torch.rand(2, 1, 32, 48, 32)).shape == (2, 1)
    with pytest.raises(ValueError, match="in_shape"):
        build_detector((32, 48, 32))


def test_detectability_two_halves_of_one_set_is_near_chance():
    x = _phantom_images(range(48))
    rng_state = torch.random.get_rng_state()
    r = detectability(x[:24], x[24:], num_folds=3, num_steps=20, seed=0, progress=False)
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # no global seeding
    assert r["auc"] < 0.75
    assert len(r["fold_auc"]) == 3 and r["num_folds"] == 3 and r["seed"] == 0
    assert [f["num_real"] for f in r["folds"]] == [8, 8, 8]
    assert len(r["scores"]["real"]) == 24 and all(0 <= v <= 1 for v in r["scores"]["synthetic"])


def test_detectability_real_vs_noise_is_near_one():
    x = _phantom_images(range(12))
    noise = torch.rand(12, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    r = detectability(x, noise, num_folds=2, num_steps=15, seed=1, progress=False)
    assert r["auc"] > 0.95
    assert all(a > 0.9 for a in r["fold_auc"])


def test_detectability_is_seeded_and_validates():
    x = _phantom_images(range(8))
    y = F.avg_pool3d(x, 3, 1, 1)
    a = detectability(x, y, num_folds=2, num_steps=2, batch_size=4, seed=3, progress=False)
    b = detectability(x, y, num_folds=2, num_steps=2, batch_size=4, seed=3, progress=False)
    assert a["scores"] == b["scores"] and a["fold_auc"] == b["fold_auc"]
    with pytest.raises(ValueError, match="same C, H, W, D"):
        detectability(x, x[..., :8], progress=False)
    with pytest.raises(ValueError, match="num_folds"):
        detectability(x, y, num_folds=9, progress=False)
    with pytest.raises(ValueError, match="num_steps"):
        detectability(x, y, num_folds=2, num_steps=0, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        detectability(x, y, num_folds=2, batch_size=1, progress=False)

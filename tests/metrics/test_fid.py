"""Fréchet distance / FID-2.5D on known inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from duodiff.metrics import fid_2p5d, frechet_distance, frechet_distance_from_stats, slice_features, sqrtm_psd


def _psd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    return a @ a.T + 0.1 * torch.eye(n, dtype=torch.float64)


def test_sqrtm_psd_squares_back():
    m = _psd(6, 0)
    r = sqrtm_psd(m)
    torch.testing.assert_close(r @ r, m, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(r, r.T)


def test_frechet_closed_form_for_diagonal_gaussians():
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    s1, s2 = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 1.0])
    expected = float(((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * (s1 * s2).sqrt()).sum())  # 5 + (1 + 1 + 4)
    got = frechet_distance_from_stats(mu1, torch.diag(s1), mu2, torch.diag(s2))
    assert got == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(11.0)


def test_frechet_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    import numpy as np

    s1, s2 = _psd(5, 1), _psd(5, 2)
    mu1, mu2 = torch.zeros(5), torch.ones(5)
    covmean = linalg.sqrtm(s1.numpy() @ s2.numpy()).real
    ref = 5.0 + float(np.trace(s1.numpy()) + np.trace(s2.numpy()) - 2 * np.trace(covmean))
    assert frechet_distance_from_stats(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-6)


def test_identical_sets_zero_and_shift_grows():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 8, generator=g)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    d_small = frechet_distance(a, a + 0.5)
    d_big = frechet_distance(a, a + 2.0)
    assert d_small == pytest.approx(8 * 0.25, rel=1e-6)  # a pure mean shift adds |delta|^2
    assert d_big > d_small > 0


def test_frechet_rejects_bad_shapes():
    with pytest.raises(ValueError, match="same F"):
        frechet_distance(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="M >= 2"):
        frechet_distance(torch.zeros(1, 3), torch.zeros(4, 3))


class _Net(nn.Module):
    """A fixed random conv feature network (maps, pooled by slice_features)."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.conv = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU())

    def forward(self, x):
        return self.conv(x)


def test_fid_2p5d_identical_zero_shifted_larger():
    g = torch.Generator().manual_seed(1)
    real = torch.rand(6, 1, 12, 14, 10, generator=g)
    net = _Net()
    same = fid_2p5d(real, real.clone(), net)
    assert set(same) == {"axial", "coronal", "sagittal", "mean"}
    assert same["mean"] == pytest.approx(0.0, abs=1e-6)
    shifted = fid_2p5d(real, (real * 0.5 + 0.4).clamp(0, 1), net)
    assert all(shifted[p] > 1e-3 for p in ("axial", "coronal", "sagittal"))
    assert shifted["mean"] == pytest.approx(sum(shifted[p] for p in ("axial", "coronal", "sagittal")) / 3)
    with pytest.raises(ValueError, match="share"):
        fid_2p5d(real, real[:, :, :10], net)


def test_slice_features_counts_and_pooling():
    vol = torch.rand(2, 1, 12, 14, 10)
    net = _Net()
    assert slice_features(vol, net, "axial").shape == (2 * 10, 8)
    assert slice_features(vol, net, "coronal").shape == (2 * 14, 8)
    assert slice_features(vol, net, "sagittal").shape == (2 * 12, 8)
    with pytest.raises(ValueError, match="plane"):
        slice_features(vol, net, "oblique")
    with pytest.raises(TypeError, match="nn.Module"):
        slice_features(vol, lambda x: x, "axial")  # type: ignore[arg-type]

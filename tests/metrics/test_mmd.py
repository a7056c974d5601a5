"""Gaussian MMD on known inputs."""

from __future__ import annotations

import pytest
import torch

from duodiff.metrics import gaussian_mmd, median_bandwidth


def test_mmd_identical_zero_shift_positive_and_monotone():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 5, generator=g)
    assert gaussian_mmd(x, x.clone())["mmd2"] == pytest.approx(0.0, abs=1e-12)
    h = median_bandwidth(x, x)
    near = gaussian_mmd(x, x + 0.3, bandwidth=h)["mmd2"]
    far = gaussian_mmd(x, x + 1.5, bandwidth=h)["mmd2"]
    assert 0 < near < far
    same_dist = gaussian_mmd(x, torch.randn(60, 5, generator=g), bandwidth=h)["mmd2"]
    assert same_dist < far


def test_mmd_rejects_bad_input():
    with pytest.raises(ValueError, match="features"):
        gaussian_mmd(torch.zeros(3, 2), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="bandwidth"):
        gaussian_mmd(torch.zeros(3, 2), torch.zeros(3, 2), bandwidth=0.0)

"""MS-SSIM (scale selection, identity, diversity) on known inputs."""

from __future__ import annotations

import pytest
import torch

from duodiff.metrics import ms_ssim, ms_ssim_weights, pairwise_ms_ssim


@pytest.mark.parametrize(
    ("shape", "kernel", "scales"),
    [((16, 16, 16), 7, 2), ((32, 48, 32), 7, 3), ((160, 160, 64), 7, 4), ((200, 200, 200), 11, 5),
     ((7, 20, 20), 7, 1)],
)
def test_ms_ssim_weights_fit_monai_check(shape, kernel, scales):
    w = ms_ssim_weights(shape, kernel)
    assert len(w) == scales
    assert sum(w) == pytest.approx(1.0)
    x = torch.rand(1, 1, *shape) if max(shape) <= 48 else None
    if x is not None:  # MONAI accepts the chosen weights (it raises ValueError otherwise)
        assert float(ms_ssim(x, x, kernel_size=kernel)[0]) == pytest.approx(1.0, abs=1e-5)


def test_ms_ssim_weights_too_small():
    with pytest.raises(ValueError, match="kernel_size"):
        ms_ssim_weights((6, 32, 32), 7)


def test_ms_ssim_identical_is_one_and_noise_lowers_it():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 32, 48, 32, generator=g)
    same = ms_ssim(x, x.clone())
    assert same.shape == (3,)
    torch.testing.assert_close(same, torch.ones(3), atol=1e-5, rtol=0)
    noisy = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert float(ms_ssim(x, noisy).max()) < 0.95
    with pytest.raises(ValueError, match="one shape"):
        ms_ssim(x, x[:, :, :16])


def test_pairwise_ms_ssim_collapsed_set_is_one_diverse_set_lower():
    g = torch.Generator().manual_seed(1)
    one = torch.rand(1, 1, 16, 16, 16, generator=g)
    collapsed = pairwise_ms_ssim(one.repeat(5, 1, 1, 1, 1))
    assert collapsed["mean"] == pytest.approx(1.0, abs=1e-5)
    assert collapsed["num_pairs"] == 10
    diverse = pairwise_ms_ssim(torch.rand(5, 1, 16, 16, 16, generator=g), max_pairs=4, seed=3)
    assert diverse["num_pairs"] == 4
    assert diverse["mean"] < 0.5
    with pytest.raises(ValueError, match="at least 2"):
        pairwise_ms_ssim(one)

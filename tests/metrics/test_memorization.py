"""The memorisation check: normalised cross-correlation and the nearest real case."""

from __future__ import annotations

import pytest
import torch

from duodiff.metrics import nearest_real, normalized_cross_correlation
from tests.metrics.test_consistency import _phantoms


def test_ncc_properties():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 1, 8, 8, 8, generator=g)
    ncc = normalized_cross_correlation(a, torch.cat([a[:1] * 3 + 1, torch.zeros(1, 1, 8, 8, 8)]))
    assert ncc.shape == (3, 2)
    assert float(ncc[0, 0]) == pytest.approx(1.0)  # invariant to affine intensity changes
    assert float(ncc[1, 0]) < 0.3
    assert torch.all(ncc[:, 1] == 0)  # constant volume


def test_memorization_flags_exact_copy():
    images, _ = _phantoms(5)
    real = images[:4]
    g = torch.Generator().manual_seed(1)
    synthetic = torch.stack([real[2], torch.rand(1, 16, 16, 16, generator=g)])
    out = nearest_real(synthetic, real, real_names=[f"r{i}" for i in range(4)], synthetic_names=["copy", "noise"],
                       threshold=0.95)
    assert out["num_flagged"] == 1
    assert out["flagged"][0]["synthetic"] == "copy" and out["flagged"][0]["real"] == "r2"
    assert out["flagged"][0]["ncc"] == pytest.approx(1.0)
    assert out["nearest"][0]["ssim"] == pytest.approx(1.0, abs=1e-5)
    assert out["nearest"][1]["ncc"] < 0.5
    ref = nearest_real(real, real, exclude_self=True, with_ssim=False)
    assert ref["ncc"]["max"] < 1.0  # distinct phantoms are not copies of each other
    with pytest.raises(ValueError, match="threshold"):
        nearest_real(synthetic, real, threshold=2.0)

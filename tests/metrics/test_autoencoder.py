"""Autoencoder fidelity (PSNR / SSIM / L1, label Dice) on known inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from duodiff.metrics import (
    image_reconstruction,
    label_reconstruction,
    psnr,
    reconstruct,
    ssim,
)
from duodiff.testing import phantom_pair

pytestmark = pytest.mark.usefixtures("one_thread")


class ShiftAutoencoder(nn.Module):
    """``AutoencoderKL``-like: the posterior mean is the input, decoding adds ``shift`` (0: identity)."""

    def __init__(self, shift: float = 0.0) -> None:
        super().__init__()
        self.shift = shift
        self.dummy = nn.Parameter(torch.zeros(()))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, torch.zeros_like(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.shift


class BackgroundAutoencoder(ShiftAutoencoder):
    """Decodes every voxel as background."""

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(z)
        out[:, 0] = 1.0
        return out


def _phantom_images(seeds, shape=(16, 16, 16)) -> torch.Tensor:
    images = np.stack([phantom_pair(shape, num_classes=3, seed=s)[0] for s in seeds])
    return (torch.from_numpy(images)[:, None] / 1000.0).clamp(0, 1)


def _phantom_labels(seeds, shape=(16, 16, 16)) -> torch.Tensor:
    return torch.from_numpy(np.stack([phantom_pair(shape, num_classes=3, seed=s)[1] for s in seeds])).long()[:, None]


# ----------------------------------------------------------------------------------------- PSNR / SSIM / L1
def test_psnr_and_ssim_on_known_arrays():
    g = torch.Generator().manual_seed(0)
    x = 0.2 + 0.6 * torch.rand(3, 1, 16, 16, 16, generator=g)
    torch.testing.assert_close(psnr(x, x + 0.1), torch.full((3,), 20.0), atol=1e-3, rtol=0)  # MSE 0.01
    torch.testing.assert_close(psnr(x, x + 0.01), torch.full((3,), 40.0), atol=1e-3, rtol=0)
    assert torch.isinf(psnr(x, x.clone())).all()
    torch.testing.assert_close(ssim(x, x.clone()), torch.ones(3), atol=1e-5, rtol=0)
    noisy = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert float(ssim(x, noisy).max()) < 0.8
    with pytest.raises(ValueError, match="one shape"):
        psnr(x, x[:, :, :8])
    with pytest.raises(ValueError, match="kernel_size"):
        ssim(x[..., :8], x[..., :8])


def test_image_reconstruction_identity_and_shift():
    x = 0.2 + 0.6 * torch.rand(4, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    same = image_reconstruction(ShiftAutoencoder(), x, names=[f"c{i}" for i in range(4)], batch_size=3)
    assert same["psnr_db"]["mean"] == 100.0  # inf capped so that the report stays valid JSON
    assert same["ssim"]["mean"] == pytest.approx(1.0, abs=1e-5)
    assert same["l1"]["max"] == 0.0
    assert same["num_cases"] == 4 and [c["name"] for c in same["per_case"]] == ["c0", "c1", "c2", "c3"]

    shifted = image_reconstruction(ShiftAutoencoder(0.1), x)
    assert shifted["psnr_db"]["mean"] == pytest.approx(20.0, abs=1e-3)
    assert shifted["l1"]["mean"] == pytest.approx(0.1, abs=1e-5)
    assert shifted["ssim"]["mean"] < 1.0
    # the decoded image is clamped to [0, 1]: a shift of +1 leaves every voxel at 1
    clamped = image_reconstruction(ShiftAutoencoder(1.0), x)
    assert clamped["l1"]["mean"] == pytest.approx(float((1 - x).abs().mean()), abs=1e-5)
    with pytest.raises(ValueError, match="names"):
        image_reconstruction(ShiftAutoencoder(), x, names=["a"])
    with pytest.raises(ValueError, match="float"):
        image_reconstruction(ShiftAutoencoder(), x.long())


def test_label_reconstruction_identity_and_background():
    labels = _phantom_labels(range(3))
    names = ["background", "outer", "inner"]
    same = label_reconstruction(ShiftAutoencoder(), labels, num_classes=3, label_names=names)
    assert same["dice"] == {"outer": pytest.approx(1.0), "inner": pytest.approx(1.0)}
    assert same["mean_dice"] == pytest.approx(1.0)
    assert len(same["per_case"]) == 3
    empty = label_reconstruction(BackgroundAutoencoder(), labels, num_classes=3, label_names=names)
    assert empty["dice"] == {"outer": 0.0, "inner": 0.0}
    with pytest.raises(ValueError, match="range"):
        label_reconstruction(ShiftAutoencoder(), labels, num_classes=2)
    with pytest.raises(ValueError, match="integer"):
        label_reconstruction(ShiftAutoencoder(), labels.float(), num_classes=3)


def test_fidelity_of_a_real_autoencoder(tiny_pipe):
    """MONAI AutoencoderKL of the tiny pipeline: runs in eval mode, is left in its mode, gives finite numbers."""
    x = _phantom_images(range(2))
    ae = tiny_pipe.image_autoencoder
    rec = reconstruct(ae, x)
    assert rec.shape == x.shape and rec.dtype == torch.float32
    img = image_reconstruction(ae, x)
    assert math.isfinite(img["psnr_db"]["mean"]) and 0 <= img["l1"]["mean"] <= 1 and -1 <= img["ssim"]["mean"] <= 1
    lab = label_reconstruction(tiny_pipe.label_autoencoder, _phantom_labels(range(2)), num_classes=3,
                               label_names=tiny_pipe.config.label_names)
    assert set(lab["dice"]) == {"anterior", "posterior"}
    assert all(0.0 <= v <= 1.0 for v in lab["dice"].values())

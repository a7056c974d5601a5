"""Fixtures shared by the decoding tests."""

from __future__ import annotations

import pytest
import torch

from duodiff.testing import tiny_pipeline


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(volume_shape=(32, 32, 32))


@pytest.fixture(scope="module")
def latents():
    """Two latents of the tiny autoencoders (factor 2): decoded volumes are 24^3."""
    return torch.randn(2, 3, 12, 12, 12, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def big_latent():
    """One 16^3 latent (32^3 volume): room for tiles with a halo inside the volume."""
    return torch.randn(1, 3, 16, 16, 16, generator=torch.Generator().manual_seed(1))

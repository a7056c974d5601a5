"""Tiny components and phantom volumes shared by tests, docs and users.

>>> from duodiff.testing import tiny_pipeline, phantom_pair
>>> pipe = tiny_pipeline()
>>> image, label = phantom_pair((16, 16, 16), num_classes=3, seed=0)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .pipeline import DuoDiffusion

__all__ = ["randomize_weights", "tiny_pipeline", "phantom_pair"]


def randomize_weights(pipe: DuoDiffusion, *, seed: int = 0, std: float = 0.05) -> DuoDiffusion:
    """Perturb every parameter with seeded noise (in place).

    A fresh MONAI ``DiffusionModelUNet`` has a zero-initialised output conv and outputs exactly 0,
    so tests that compare outputs randomise weights first.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in pipe.modules():
            for p in module.parameters():
                p.add_(torch.randn(p.shape, generator=g).to(p) * std)
    return pipe


def tiny_pipeline(
    num_classes: int = 3,
    *,
    volume_shape: Sequence[int] = (16, 16, 16),
    seed: int = 0,
    randomize: bool = True,
    label_names: Sequence[str] | None = None,
) -> DuoDiffusion:
    """An untrained ``"tiny"`` pipeline with non-trivial (randomised) weights."""
    pipe = DuoDiffusion.from_preset(
        "tiny", num_classes=num_classes, volume_shape=volume_shape, label_names=label_names, init_seed=seed
    )
    return randomize_weights(pipe, seed=seed) if randomize else pipe


def phantom_pair(
    shape: Sequence[int] = (32, 32, 32), *, num_classes: int = 3, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic (image, label) pair: nested ellipsoids with class-dependent intensity plus noise.

    Returns:
        image: float32 ``(H, W, D)`` roughly in [0, 1000] (MRI-like arbitrary scale).
        label: uint8 ``(H, W, D)`` with ids ``0..num_classes-1``; every class is present.
    """
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    label = np.zeros(shape, dtype=np.uint8)
    center = rng.uniform(-0.15, 0.15, size=3)
    for k in range(1, num_classes):
        radius = 0.75 * (1 - (k - 1) / max(num_classes - 1, 1)) * rng.uniform(0.85, 1.0, size=3)
        inside = (((grid - center[:, None, None, None]) / radius[:, None, None, None]) ** 2).sum(0) <= 1
        label[inside] = k
    base = np.array([50.0] + [200.0 + 250.0 * k for k in range(1, num_classes)])
    image = base[label] + rng.normal(0, 20.0, size=shape)
    return image.astype(np.float32), label

"""Stage helpers: random patches."""

from __future__ import annotations

import torch


def test_random_patches_crop_every_tensor_alike_and_reproducibly():
    from duodiff.train.stages import random_patches

    x = torch.arange(2 * 8 * 10 * 12, dtype=torch.float32).reshape(2, 1, 8, 10, 12)
    y = x.clone().to(torch.uint8)
    a, b = random_patches((x, y), (4, 4, 8), torch.Generator().manual_seed(0))
    assert a.shape == (2, 1, 4, 4, 8) and torch.equal(a.to(torch.uint8), b)
    for i in range(2):  # each patch is a contiguous block of its own sample
        first = int(a[i, 0, 0, 0, 0])
        h, rest = divmod(first - i * 960, 120)
        w, d = divmod(rest, 12)
        assert torch.equal(a[i], x[i, :, h:h + 4, w:w + 4, d:d + 8])
    again, _ = random_patches((x, y), (4, 4, 8), torch.Generator().manual_seed(0))
    assert torch.equal(a, again)
    assert random_patches((x,), None, torch.Generator())[0] is x

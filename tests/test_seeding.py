"""One seed derivation (``duodiff.seeding.hash_seed``) behind every derived stream, with the values it always had."""

from __future__ import annotations

import hashlib

import pytest
import torch

from duodiff.control import retry_seed
from duodiff.data.sampler import derive_seed
from duodiff.sampling import stage_generators
from duodiff.seeding import hash_seed


def _sha_seed(text: str, shift: int) -> int:
    """The derivation as the streams were first written (so a changed rule fails here)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> shift


@pytest.mark.parametrize("seed", [0, 7, 2**40])
def test_every_stream_keeps_its_seed(seed):
    for stage in ("label", "image"):
        expected = torch.Generator().manual_seed(_sha_seed(f"duodiff:{stage}:{seed}", 1)).initial_seed()
        assert stage_generators([seed], stage)[0].initial_seed() == expected
    assert hash_seed(seed, "label_unet", "noise", 3, 0) == _sha_seed(f"{seed}:label_unet:noise:3:0", 1)
    assert derive_seed(seed, "real", 2) == _sha_seed(f"duodiff-mix:{seed}:real:2", 1)
    assert retry_seed(seed, 101) == _sha_seed(f"duodiff:retry:{seed}:101", 2)


@pytest.mark.parametrize("bits", [0, 65, True, 8.0])
def test_hash_seed_rejects_a_bad_width(bits):
    with pytest.raises(ValueError, match="bits must be an int in"):
        hash_seed(1, bits=bits)

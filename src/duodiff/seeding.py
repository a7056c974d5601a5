"""The one seed derivation of duodiff: a seed hashed from named parts.

Every derived random stream (a sample's label and image stages, a training step's data order and noise, a
mixed loader's order, a rejected sample's retry) takes its seed from :func:`hash_seed`, so a stream depends only
on its parts: the same in every process, on every run and across versions.

Example:
    >>> from duodiff.seeding import hash_seed
    >>> hash_seed("duodiff", "label", 0) == hash_seed("duodiff", "label", 0) != hash_seed("duodiff", "image", 0)
    True
"""

from __future__ import annotations

import hashlib

__all__ = ["hash_seed"]


def hash_seed(*parts: object, bits: int = 63) -> int:
    """A ``bits``-bit seed from ``parts``: the first 8 bytes (little-endian) of SHA-256 of ``"p0:p1:..."``.

    Args:
        parts: anything with a stable ``str`` (ints, names).
        bits: width of the result, 1 to 64 (63 fits ``torch.Generator.manual_seed`` and a signed int64).

    Returns:
        an int in ``[0, 2**bits)``.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 64:
        raise ValueError(f"bits must be an int in [1, 64], got {bits!r}.")
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> (64 - bits)

"""A model's identity as a short hash of its config and weights (cache keys of generated data and dtype choices)."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

import torch

from . import keys

if TYPE_CHECKING:  # pragma: no cover
    from .hub import HubMixin

__all__ = ["model_fingerprint"]


def model_fingerprint(pipe: HubMixin, generation: dict[str, Any]) -> str:
    """A hex digest of the model's config and weights and the generation settings (cache key)."""
    h = hashlib.sha256()
    h.update(json.dumps(pipe.config.to_dict(), sort_keys=True, default=str).encode())
    h.update(json.dumps(generation, sort_keys=True, default=str).encode())
    networks = pipe.components()
    for name in keys.COMPONENTS:
        for pname, tensor in sorted(networks[name].state_dict().items()):
            t = tensor.detach().to("cpu").contiguous()
            h.update(f"{name}.{pname}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:20]

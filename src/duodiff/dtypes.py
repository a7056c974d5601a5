"""dtype names and autocast: the one place that knows ``"bf16"`` means ``torch.bfloat16``.

Every dtype a user can name (``pipe.to("bfloat16")``, ``from_pretrained(dtype="fp16")``, ``sample(dtype=...)``, a
training stage's ``amp``, ``$DUODIFF_AUTO_DTYPE``) goes through :func:`resolve_dtype`, and every autocast region
through :func:`autocast`.

>>> import torch
>>> from duodiff.dtypes import autocast, resolve_dtype
>>> resolve_dtype("bf16")
torch.bfloat16
>>> with autocast("cpu", torch.float32):  # float32 (or None): no autocast at all
...     pass
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

__all__ = ["DTYPES", "resolve_dtype", "is_dtype_name", "autocast", "autocast_dtype"]

#: Accepted dtype names (lower case) and the torch dtypes they mean.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Map ``"bf16"``/``"float16"``/``torch.float32``/... to a torch dtype (``None`` stays ``None``).

    Raises:
        ValueError: a name not in :data:`DTYPES` or a torch dtype other than float32, bfloat16 and float16.
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        if isinstance(dtype, torch.dtype) and dtype not in DTYPES.values():
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}.")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ValueError(f"dtype must be one of {sorted(DTYPES)} or a torch dtype (or 'auto' when sampling), "
                     f"got {dtype!r}.")


def is_dtype_name(value: Any) -> bool:
    """Whether ``value`` is a string naming a dtype (any case), e.g. ``"BF16"``."""
    return isinstance(value, str) and value.lower() in DTYPES


def autocast(device_type: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device_type``; no autocast for ``None`` and float32."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype of the autocast region active on ``device_type`` now, or ``None`` outside autocast."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)

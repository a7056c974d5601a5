"""Reading PyTorch ``.pt`` state dicts safely: ``torch.load(weights_only=True)``, one state dict picked out of a
checkpoint, wrapper prefixes (DDP, DataParallel, ``torch.compile``) removed, NaN/Inf refused.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch

__all__ = ["load_checkpoint", "strip_wrapper_prefixes"]

#: Prefixes added by ``DistributedDataParallel`` / ``DataParallel`` and ``torch.compile``; stripped (in any
#: order and nesting) while every key has one.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
#: ``torch.compile`` of a submodule puts ``_orig_mod.`` inside keys (``encoder._orig_mod.conv.weight``).
_COMPILED_SUBMODULE = re.compile(r"(?:^|(?<=\.))_orig_mod\.")


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def load_checkpoint(path: str | os.PathLike, *, key: str | None = None) -> dict[str, torch.Tensor]:
    """Read a PyTorch state dict safely with ``torch.load(weights_only=True)`` (never arbitrary unpickling).

    Accepts a plain state dict, or a checkpoint dict holding exactly one state dict (e.g. MONAI bundle /
    training checkpoints ``{"model": {...}, "epoch": 3}``); ``key`` picks one when there are several.
    Wrapper prefixes (``module.`` of DDP / DataParallel, ``_orig_mod.`` of ``torch.compile``, in any
    nesting) are removed (:func:`strip_wrapper_prefixes`).

    Returns:
        ``{name: tensor}`` on the CPU.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is empty, not a PyTorch file, holds Python objects other than tensors and
            containers, holds NaN/Inf weights, or holds no (or several) state dicts.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint file at {str(path)!r}.")
    if path.stat().st_size == 0:
        raise ValueError(f"Checkpoint {str(path)!r} is empty (0 bytes).")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"Checkpoint {str(path)!r} holds Python objects other than tensors (e.g. a whole pickled model), which "
            "duodiff refuses to unpickle. In the environment that made it, re-save only the weights: "
            f"torch.save(model.state_dict(), 'weights.pt'). ({str(e).splitlines()[0]})"
        ) from e
    except Exception as e:  # torch raises RuntimeError/EOFError/... for corrupt or foreign files
        raise ValueError(
            f"{str(path)!r} is not a readable PyTorch checkpoint ({type(e).__name__}: {_short(e)}). It may be "
            "truncated or another format."
        ) from e
    state = strip_wrapper_prefixes(_select_state_dict(obj, path, key), source=repr(str(path)))
    _check_finite(state, repr(str(path)))
    return state


def strip_wrapper_prefixes(state: Mapping[str, torch.Tensor], *, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The state dict of the network inside ``DistributedDataParallel`` / ``DataParallel`` / ``torch.compile``.

    Wrappers rename every key: DDP and DataParallel add ``module.``, ``torch.compile`` adds ``_orig_mod.``,
    and nested wrappers stack them (``torch.compile(DDP(net))`` -> ``_orig_mod.module.``). Leading prefixes
    shared by *every* key are removed until none is left, and ``_orig_mod.`` segments inside keys (a compiled
    submodule) are dropped. Tensors are not copied or changed.

    Example:
        >>> sorted(strip_wrapper_prefixes({"_orig_mod.module.conv.weight": torch.zeros(1)}))
        ['conv.weight']

    Raises:
        ValueError: two keys become the same name (the state dict is not one wrapped network).
    """
    out = dict(state)
    stripped = True
    while out and stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in out):
                out = {k[len(prefix):]: v for k, v in out.items()}
                stripped = True
    renamed = {_COMPILED_SUBMODULE.sub("", k): v for k, v in out.items()}
    if len(renamed) != len(out):
        clash = sorted(k for k in out if _COMPILED_SUBMODULE.sub("", k) != k)[:3]
        raise ValueError(
            f"Checkpoint {source}: keys such as {clash} collide with other keys once the torch.compile prefix "
            "'_orig_mod.' is removed; save the weights of one unwrapped network (model.state_dict())."
        )
    return renamed


def _check_finite(state: Mapping[str, torch.Tensor], source: str) -> None:
    for k, v in state.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ValueError(f"Checkpoint {source}: tensor {k!r} contains NaN or Inf; the weights are broken.")


def _select_state_dict(obj: object, path: Path, key: str | None) -> dict[str, torch.Tensor]:
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            found = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
            raise ValueError(f"Checkpoint {str(path)!r} has no entry {key!r}; it holds {found}.")
        obj = obj[key]
        if not _is_state_dict(obj):
            raise ValueError(f"Entry {key!r} of checkpoint {str(path)!r} is not a state dict (name -> tensor).")
        return dict(obj)
    if _is_state_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        nested = [str(k) for k, v in obj.items() if _is_state_dict(v)]
        if len(nested) == 1:
            return dict(obj[nested[0]])
        if len(nested) > 1:
            raise ValueError(
                f"Checkpoint {str(path)!r} holds several state dicts {nested}; choose one with key= (--key)."
            )
        entries = sorted(map(str, obj))[:10]
        raise ValueError(f"Checkpoint {str(path)!r} holds no state dict (name -> tensor); its entries are {entries}.")
    raise ValueError(f"Checkpoint {str(path)!r} holds a {type(obj).__name__}, not a state dict (name -> tensor).")


def _short(e: BaseException) -> str:
    """The informative line of a (possibly long, multi-line) torch loading error."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    detail = [ln for ln in lines if ln.startswith(("size mismatch", "Missing key", "Unexpected key"))]
    return (detail or lines or [type(e).__name__])[0][:300]

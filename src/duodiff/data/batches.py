"""Batch helpers of :func:`~duodiff.mix_loaders`: size, split and merge collated batches of any structure.

A collated batch is a tensor, a list of per-sample values (strings, numbers), or a dict / tuple / list of
those. Real and synthetic batches are merged along the batch dimension after checking that their keys,
shapes (after the batch dimension), dtypes and tensor kinds match; batched MONAI ``MetaTensor`` objects keep
one affine per sample, so real scans and synthetic pairs of different geometry can share a batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["register_meta_tensor_collate", "batch_len", "slice_batch", "merge_batches"]


def register_meta_tensor_collate() -> None:
    """Make ``torch.utils.data.default_collate`` batch MONAI ``MetaTensor`` objects with one affine per sample.

    Torch's default collate stacks ``MetaTensor`` objects with ``torch.stack``, which keeps the *first* item's
    metadata for the whole batch: a batch of real and synthetic samples gets one affine (``(4, 4)``), and
    ``monai.data.decollate_batch`` then hands each sample a row of it. MONAI only registers its own
    ``MetaTensor`` collate (per-sample metadata, affine ``(B, 4, 4)``) once ``list_data_collate`` has run
    somewhere in the process, so the result depended on what ran before. Importing duodiff registers MONAI's
    function (the one ``monai.data.DataLoader`` uses) in torch's default collate map, in the main process and in
    every DataLoader worker that unpickles a duodiff dataset, so ``torch.utils.data.DataLoader``,
    ``monai.data.DataLoader`` and :func:`~duodiff.mix_loaders` batch ``MetaTensor`` objects the same way. A collate
    function registered for ``MetaTensor`` before is kept.
    """
    from monai.data.meta_tensor import MetaTensor
    from monai.data.utils import collate_meta_tensor_fn
    from torch.utils.data._utils.collate import default_collate_fn_map

    default_collate_fn_map.setdefault(MetaTensor, collate_meta_tensor_fn)


register_meta_tensor_collate()


LEAF_TYPES = (str, bytes, int, float, bool, type(None))


def is_leaf_list(x: Any) -> bool:
    """A collated list of per-sample values (strings, numbers), as opposed to a list of tensors/structures."""
    return isinstance(x, list) and all(isinstance(v, LEAF_TYPES) for v in x)


def batch_len(x: Any, path: str = "batch") -> int:
    """The number of samples in batch ``x`` (its first tensor's or value list's length); ``path`` names it in errors."""
    if isinstance(x, torch.Tensor):
        if x.ndim == 0:
            raise ValueError(f"{path} is a 0-d tensor; batches need a leading batch dimension.")
        return int(x.shape[0])
    if is_leaf_list(x):
        return len(x)
    if isinstance(x, Mapping):
        for k, v in x.items():
            try:
                return batch_len(v, f"{path}[{k!r}]")
            except TypeError:
                continue
    if isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            try:
                return batch_len(v, f"{path}[{i}]")
            except TypeError:
                continue
    raise TypeError(f"Cannot find the batch size of {path} ({type(x).__name__}); batches must contain tensors.")


def slice_batch(x: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of batch ``x``, in the same structure."""
    if isinstance(x, torch.Tensor):
        return x[start:stop]
    if is_leaf_list(x):
        return x[start:stop]
    if isinstance(x, Mapping):
        return {k: slice_batch(v, start, stop) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(slice_batch(v, start, stop) for v in x)
    if isinstance(x, list):
        return [slice_batch(v, start, stop) for v in x]
    raise TypeError(f"Cannot split a batch element of type {type(x).__name__}; use tensors, dicts, tuples or lists.")


def cat_tensors(parts: Sequence[torch.Tensor], path: str) -> torch.Tensor:
    """Concatenate batched tensors of the same shape and dtype; MetaTensors keep one affine per sample."""
    from monai.data import MetaTensor

    first = parts[0]
    for other in parts[1:]:
        if tuple(other.shape[1:]) != tuple(first.shape[1:]) or other.dtype != first.dtype:
            raise ValueError(
                f"{path}: real samples have shape {tuple(first.shape[1:])} and dtype {first.dtype}, synthetic ones "
                f"{tuple(other.shape[1:])} and {other.dtype}. Make them match with a transform on one side, e.g. "
                "monai.transforms.EnsureTyped(keys, dtype=...) or ResizeWithPadOrCropd(keys, spatial_size=...)."
            )
    if not isinstance(first, MetaTensor):  # a plain real tensor: the result is plain too
        return torch.cat([p.as_tensor() if isinstance(p, MetaTensor) else p for p in parts])
    if not all(isinstance(p, MetaTensor) for p in parts):
        raise TypeError(
            f"{path}: the real batch holds a MetaTensor but the synthetic one a plain tensor; collate both the "
            "same way (e.g. monai.data.DataLoader / list_data_collate for both)."
        )
    # one MetaTensor per sample, in order, then batched again: every sample keeps its own affine. A part
    # that is not a batch (stacked without MONAI's collate) holds one affine for all its samples.
    from monai.data import decollate_batch
    from monai.data.utils import collate_meta_tensor

    items = [item for p in parts for item in (decollate_batch(p, detach=False) if p.is_batch
                                               else [p[i] for i in range(p.shape[0])])]
    return collate_meta_tensor(items)


def merge_batches(real: Any, synthetic: Any, path: str) -> Any:
    """Concatenate a real and a synthetic batch of the same structure along the batch dimension."""
    if isinstance(real, torch.Tensor):
        if not isinstance(synthetic, torch.Tensor):
            raise TypeError(f"{path}: the real batch holds a tensor, the synthetic one a {type(synthetic).__name__}.")
        return cat_tensors([real, synthetic], path)
    if is_leaf_list(real):
        if not is_leaf_list(synthetic):
            raise TypeError(f"{path}: the real batch holds a list of values, the synthetic one a "
                            f"{type(synthetic).__name__}.")
        return real + synthetic
    if isinstance(real, Mapping):
        if not isinstance(synthetic, Mapping):
            raise TypeError(f"{path}: the real batch is a dict, the synthetic one a {type(synthetic).__name__}.")
        missing = [k for k in real if k not in synthetic]
        extra = [k for k in synthetic if k not in real]
        if missing or extra:
            raise ValueError(
                f"{path}: keys differ between real and synthetic batches: missing in synthetic {missing}, only in "
                f"synthetic {extra}. Add or drop keys with a transform (e.g. monai.transforms.DeleteItemsd) so both "
                "have the same keys."
            )
        return {k: merge_batches(real[k], synthetic[k], f"{path}[{k!r}]") for k in real}
    if isinstance(real, (list, tuple)):
        if not isinstance(synthetic, (list, tuple)) or len(synthetic) != len(real):
            what = (f"a sequence of {len(synthetic)}" if isinstance(synthetic, (list, tuple))
                    else type(synthetic).__name__)
            raise ValueError(f"{path}: the real batch is a sequence of {len(real)} elements, the synthetic one {what}.")
        merged = [merge_batches(a, b, f"{path}[{i}]") for i, (a, b) in enumerate(zip(real, synthetic))]
        return tuple(merged) if isinstance(real, tuple) else merged
    raise TypeError(f"{path}: cannot merge batch elements of type {type(real).__name__}.")

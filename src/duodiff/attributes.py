"""Per-class label attributes used to condition the label LDM (classifier-free guidance).

Attributes are computed automatically from label maps:

* ``"volume"``: voxel count of every foreground class (the model sees ``log1p(voxels)``, standardised with the
  training mean/std stored in the pipeline config). Users request volumes in **millilitres**; they are converted
  to voxels with the model's spacing.
* ``"centroid"``: centre of mass of every foreground class, normalised to ``[0, 1]`` per axis.

The UNet sees one cross-attention token ``(N, 1, cross_attention_dim)`` = ``[values * mask, mask, 0...]``: an
attribute with ``mask = 0`` is "unspecified". Training drops attributes at random (``condition_dropout``) so the
same network is also unconditional, which is what classifier-free guidance needs.

Requested volumes are checked against what the model can make: a volume above the field of view
(``volume_shape`` x ``spacing``) is a ``ValueError`` (often a voxel count passed as mL), and one more than
:data:`TRAINING_RANGE_SIGMAS` standard deviations of ``log1p(voxels)`` from the training mean (the statistics
the model records) warns with :class:`OutOfTrainingRangeWarning`, giving the training range in mL.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .config import PipelineConfig
    from .sampling_options import ClassVolumes

__all__ = [
    "SUPPORTED_ATTRIBUTES",
    "attribute_names",
    "compute_attributes",
    "standardise",
    "make_context",
    "requested_attributes",
    "class_volumes_ml",
    "field_of_view_ml",
    "warn_outside_training_range",
    "OutOfTrainingRangeWarning",
    "TRAINING_RANGE_SIGMAS",
]

SUPPORTED_ATTRIBUTES = ("volume", "centroid")

#: A requested volume whose ``log1p(voxels)`` lies more than this many training standard deviations from the
#: training mean warns (the model has not seen such sizes; the request may be ignored or give odd labels).
TRAINING_RANGE_SIGMAS = 3.0


class OutOfTrainingRangeWarning(UserWarning):
    """A requested attribute lies far outside the range the model was trained on."""


def field_of_view_ml(volume_shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Volume of the whole generated field of view in mL (``prod(volume_shape) * prod(spacing) / 1000``)."""
    return math.prod(int(s) for s in volume_shape) * math.prod(float(s) for s in spacing) / 1000.0


def attribute_names(attributes: Sequence[str], label_names: Sequence[str]) -> list[str]:
    """Flat names of every attribute column, e.g. ``["volume:Anterior", "volume:Posterior"]``."""
    out = []
    for a in attributes:
        if a not in SUPPORTED_ATTRIBUTES:
            raise ValueError(f"Unknown attribute {a!r}; supported: {list(SUPPORTED_ATTRIBUTES)}.")
        for name in label_names[1:]:
            if a == "volume":
                out.append(f"volume:{name}")
            else:
                out += [f"centroid_{ax}:{name}" for ax in "xyz"]
    return out


def compute_attributes(labels: torch.Tensor, num_classes: int, attributes: Sequence[str]) -> torch.Tensor:
    """Raw attribute values of label maps.

    Args:
        labels: integer ``(N, 1, H, W, D)``.
        num_classes: classes including background.
        attributes: subset of :data:`SUPPORTED_ATTRIBUTES`, in order.

    Returns:
        float32 ``(N, A)``: ``log1p(voxels)`` per class for ``"volume"``; normalised centroid (3 per class,
        0.5 where a class is absent) for ``"centroid"``.
    """
    lab = labels[:, 0].long()
    n = lab.shape[0]
    cols = []
    spatial = lab.shape[1:]
    grids = torch.meshgrid(*[torch.linspace(0, 1, s) for s in spatial], indexing="ij")
    for a in attributes:
        for k in range(1, num_classes):
            mask = (lab == k).float()
            count = mask.flatten(1).sum(1)
            if a == "volume":
                cols.append(torch.log1p(count))
            elif a == "centroid":
                for g in grids:
                    c = (mask * g).flatten(1).sum(1) / count.clamp_min(1)
                    cols.append(torch.where(count > 0, c, torch.full((n,), 0.5)))
            else:
                raise ValueError(f"Unknown attribute {a!r}; supported: {list(SUPPORTED_ATTRIBUTES)}.")
    return torch.stack(cols, dim=1).float() if cols else torch.zeros((n, 0))


def standardise(values: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(values - mean) / std`` column-wise."""
    m = torch.as_tensor(list(mean), dtype=torch.float32)
    s = torch.as_tensor(list(std), dtype=torch.float32).clamp_min(1e-6)
    return (values - m) / s


def make_context(z: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Cross-attention context ``(N, 1, dim)`` from standardised values ``z`` ``(N, A)`` and a 0/1 ``mask``."""
    a = z.shape[1]
    if 2 * a > dim:
        raise ValueError(f"{a} attribute columns need cross_attention_dim >= {2 * a}, got {dim}.")
    ctx = torch.zeros((z.shape[0], 1, dim), dtype=torch.float32)
    ctx[:, 0, :a] = z * mask
    ctx[:, 0, a : 2 * a] = mask
    return ctx


def class_volumes_ml(
    labels: torch.Tensor, label_names: Sequence[str], spacing: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Foreground class volumes in mL of integer labels ``(N, 1, H, W, D)``: ``{name: (N,) float64}``."""
    voxel_ml = math.prod(spacing) / 1000.0
    lab = labels[:, 0]
    return {name: (lab == k).flatten(1).sum(1).double() * voxel_ml for k, name in enumerate(label_names) if k > 0}


def requested_attributes(
    class_volumes: Mapping[str | int, float] | Sequence[Mapping[str | int, float]] | None,
    n: int,
    *,
    attributes: Sequence[str],
    label_names: Sequence[str],
    spacing: Sequence[float],
    volume_shape: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw attribute values ``(n, A)`` and mask ``(n, A)`` for a user's ``class_volumes`` request.

    Args:
        class_volumes: ``{class name or id: volume in mL}`` for every sample, or one such mapping per sample;
            classes left out are unconditioned. ``None`` = nothing requested.
        volume_shape: the generated volume's shape; given, a request above the field of view is refused.

    Raises:
        ValueError: an unknown class, a non-positive volume, or (with ``volume_shape``) a volume, or the sum of
            one sample's volumes, larger than the field of view.
    """
    cols = attribute_names(attributes, label_names)
    values = torch.zeros((n, len(cols)))
    mask = torch.zeros((n, len(cols)))
    if class_volumes is None:
        return values, mask
    if isinstance(class_volumes, Mapping):
        per_sample = [class_volumes] * n
    else:
        per_sample = list(class_volumes)
        if len(per_sample) != n:
            raise ValueError(f"class_volumes has {len(per_sample)} entries for {n} samples; pass one mapping per "
                             "sample or a single mapping for all.")
    if "volume" not in attributes:
        raise ValueError(
            "This model was not trained with volume conditioning (attributes="
            f"{list(attributes)}); class_volumes cannot be used. Train with [model] attributes = [\"volume\"]."
        )
    voxel_ml = math.prod(spacing) / 1000.0
    fov = None if volume_shape is None else field_of_view_ml(volume_shape, spacing)
    fg = list(label_names[1:])
    for i, req in enumerate(per_sample):
        if not isinstance(req, Mapping):
            raise TypeError(f"class_volumes entries must be mappings {{class: mL}}, got {type(req).__name__}.")
        for key, ml in req.items():
            if isinstance(key, int) and not isinstance(key, bool):
                if not 1 <= key < len(label_names):
                    raise ValueError(f"class id {key} in class_volumes is not a foreground class (1..{len(fg)}).")
                name = label_names[key]
            elif key in fg:
                name = key
            else:
                raise ValueError(f"Unknown class {key!r} in class_volumes; foreground classes are {fg} "
                                 f"(or ids 1..{len(fg)}).")
            if not isinstance(ml, (int, float)) or isinstance(ml, bool) or not math.isfinite(ml) or ml <= 0:
                raise ValueError(f"class_volumes[{key!r}] must be a positive volume in mL, got {ml!r}.")
            if fov is not None and ml > fov:
                raise ValueError(
                    f"class_volumes[{key!r}] = {ml:g} mL is larger than the whole field of view, {fov:.4g} mL "
                    f"({'x'.join(map(str, volume_shape))} voxels of {'x'.join(f'{s:g}' for s in spacing)} mm). "
                    f"Volumes are in mL (1 mL = {1 / voxel_ml:.4g} voxels here); {ml:g} voxels would be "
                    f"{ml * voxel_ml:.4g} mL."
                )
            j = cols.index(f"volume:{name}")
            values[i, j] = math.log1p(ml / voxel_ml)
            mask[i, j] = 1.0
        total = sum(float(v) for v in req.values())
        if fov is not None and len(req) > 1 and total > fov:
            raise ValueError(
                f"class_volumes {dict(req)} ask for {total:g} mL in total, more than the whole field of view, "
                f"{fov:.4g} mL ({'x'.join(map(str, volume_shape))} voxels of "
                f"{'x'.join(f'{s:g}' for s in spacing)} mm). Volumes are in mL."
            )
    return values, mask


def warn_outside_training_range(
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    attributes: Sequence[str],
    label_names: Sequence[str],
    spacing: Sequence[float],
    mean: Sequence[float],
    std: Sequence[float],
    sigmas: float = TRAINING_RANGE_SIGMAS,
    stacklevel: int = 2,
) -> list[str]:
    """Warn (:class:`OutOfTrainingRangeWarning`) for requested volumes far outside the training statistics.

    Args:
        values / mask: from :func:`requested_attributes`.
        mean / std: the model's recorded per-column training statistics of the raw attributes (empty: no check).
        sigmas: how many standard deviations of ``log1p(voxels)`` from the mean count as "far outside".

    Returns:
        the warning messages (one per class and value, also when several samples ask the same).
    """
    if not mean or not std or "volume" not in attributes:
        return []
    voxel_ml = math.prod(spacing) / 1000.0
    cols = attribute_names(attributes, label_names)
    messages = []
    for j, col in enumerate(cols):
        if not col.startswith("volume:"):
            continue
        m, s = float(mean[j]), max(float(std[j]), 1e-6)
        asked = values[:, j][mask[:, j] > 0]
        far = sorted({float(v) for v in asked if abs(float(v) - m) > sigmas * s})
        if not far:
            continue
        lo, hi = (math.expm1(max(m - sigmas * s, 0.0)) * voxel_ml, math.expm1(m + sigmas * s) * voxel_ml)
        got = ", ".join(f"{math.expm1(v) * voxel_ml:.4g}" for v in far)
        name = col.split(":", 1)[1]
        messages.append(
            f"class_volumes[{name!r}] = {got} mL is far outside the training range of this model: about "
            f"{lo:.3g}-{hi:.3g} mL (mean {math.expm1(m) * voxel_ml:.3g} mL, +-{sigmas:g} std of log volume). "
            "The model may ignore the request or make implausible labels; check the unit (mL)."
        )
    for msg in messages:
        warnings.warn(msg, OutOfTrainingRangeWarning, stacklevel=stacklevel + 1)
    return messages


def class_volume_request(config: PipelineConfig, class_volumes: ClassVolumes | None, num_samples: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The raw ``(values, mask)`` of a ``class_volumes`` request (mL), checked against the model's ``config``
    (see :meth:`duodiff.DuoDiffusion.check_class_volumes`)."""
    c = config
    values, mask = requested_attributes(class_volumes, num_samples, attributes=c.attributes,
                                        label_names=c.label_names, spacing=c.spacing, volume_shape=c.volume_shape)
    if class_volumes is not None:  # stacklevel: the warning points at the caller of check_class_volumes
        warn_outside_training_range(values, mask, attributes=c.attributes, label_names=c.label_names,
                                    spacing=c.spacing, mean=c.attribute_mean, std=c.attribute_std, stacklevel=4)
    return values, mask


def attribute_context(config: PipelineConfig, class_volumes: ClassVolumes | None, num_samples: int) -> tuple:
    """``(values, mask, context, null_context)`` of a ``class_volumes`` request: the raw ``(N, A)`` values and mask,
    and the ``(N, 1, E)`` conditional and unconditional contexts (both ``None`` for an unconditioned model).

    Raises:
        ValueError: the request is invalid (see :func:`requested_attributes`), or the model is conditioned but
            records no attribute statistics (its label UNet stage has not been trained).
    """
    c = config
    values, mask = class_volume_request(c, class_volumes, num_samples)
    if not c.attributes:
        return values, mask, None, None
    if not c.attribute_mean or not c.attribute_std:
        raise ValueError(
            f"The model is conditioned on attributes {list(c.attributes)} but records no attribute statistics "
            "(attribute_mean / attribute_std in model_index.json): its label UNet was not trained by duodiff train, "
            "which records them when it trains the label_unet stage. Train that stage first, or use a model whose "
            "label UNet is trained."
        )
    dim = c.label_unet.cross_attention_dim
    context = make_context(standardise(values, c.attribute_mean, c.attribute_std), mask, dim)
    null_context = make_context(torch.zeros_like(values), torch.zeros_like(mask), dim)
    return values, mask, context, null_context

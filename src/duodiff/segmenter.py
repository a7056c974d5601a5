"""A small tri-planar 2D segmenter trained on real slices: the judge of pair consistency and the FID feature network.

`duodiff evaluate` needs two networks whose weights exist locally: a segmenter that says whether a
synthetic image shows its label (pair consistency) and a slice feature extractor for FID-2.5D. Both
are served by one MONAI ``BasicUNet`` (2D) trained on axial, coronal and sagittal slices of the *real*
pairs:

* :meth:`SliceSegmenter.forward` segments a volume slice by slice along each of the three planes and
  averages the three softmax maps (a "2.5D" ensemble).
* :attr:`SliceSegmenter.encoder` maps a slice batch to the global-average-pooled bottleneck of the
  UNet (``features[4]`` numbers per slice): the FID / MMD features.

Weights are saved as ``segmenter.safetensors`` next to ``segmenter.json`` and loaded strictly.

>>> import torch
>>> from duodiff.segmenter import train_segmenter
>>> images = torch.rand(4, 1, 16, 16, 16)
>>> labels = (images > 0.5).long()
>>> seg = train_segmenter(images, labels, num_classes=2, num_steps=2, progress=False)
>>> tuple(seg(images).shape)
(4, 2, 16, 16, 16)
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .io import atomic_write

__all__ = ["SliceSegmenter", "SliceEncoder", "train_segmenter", "PLANES", "plane_slices", "plane_stack"]

#: Slicing planes of a ``(N, C, H, W, D)`` RAS volume: axial slices lie along D, coronal along W, sagittal along H.
PLANES = ("axial", "coronal", "sagittal")
_PLANE_DIM = {"axial": 4, "coronal": 3, "sagittal": 2}

WEIGHTS_NAME = "segmenter.safetensors"
CONFIG_NAME = "segmenter.json"
DEFAULT_FEATURES = (16, 16, 32, 64, 128, 16)


def _check_plane(plane: str) -> int:
    if plane not in _PLANE_DIM:
        raise ValueError(f"plane must be one of {list(PLANES)}, got {plane!r}.")
    return _PLANE_DIM[plane]


def plane_slices(volumes: torch.Tensor, plane: str) -> torch.Tensor:
    """Cut volumes into 2D slices along one plane.

    Args:
        volumes: ``(N, C, H, W, D)``.
        plane: ``"axial"`` (slices along D, each ``(H, W)``), ``"coronal"`` (along W, ``(H, D)``)
            or ``"sagittal"`` (along H, ``(W, D)``).

    Returns:
        ``(N * S, C, h, w)`` slices, volume-major (the ``S`` slices of volume 0 first).
    """
    dim = _check_plane(plane)
    if volumes.ndim != 5:
        raise ValueError(f"volumes must be (N, C, H, W, D), got shape {tuple(volumes.shape)}.")
    n, c = volumes.shape[:2]
    moved = volumes.movedim(dim, 2)  # (N, C, S, h, w)
    return moved.transpose(1, 2).reshape(n * moved.shape[2], c, *moved.shape[3:])


def plane_stack(slices: torch.Tensor, num_volumes: int, plane: str) -> torch.Tensor:
    """Inverse of :func:`plane_slices`: ``(N * S, C, h, w)`` -> ``(N, C, H, W, D)``."""
    dim = _check_plane(plane)
    s = slices.shape[0] // num_volumes
    vol = slices.reshape(num_volumes, s, *slices.shape[1:]).transpose(1, 2)  # (N, C, S, h, w)
    return vol.movedim(2, dim)


class SliceEncoder(nn.Module):
    """The encoder half of a 2D ``BasicUNet``: slices ``(B, C, h, w)`` -> pooled bottleneck features ``(B, F)``.

    Shares its parameters with the :class:`SliceSegmenter` it came from.
    """

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, slices: torch.Tensor) -> torch.Tensor:
        u = self.unet
        x = u.down_4(u.down_3(u.down_2(u.down_1(u.conv_0(slices)))))
        return x.mean(dim=(-2, -1))


class SliceSegmenter(nn.Module):
    """Tri-planar 2D segmenter (MONAI ``BasicUNet`` with batch norm).

    Args:
        in_channels: image channels.
        num_classes: label classes including background.
        features: ``BasicUNet`` feature counts (6 numbers); ``features[4]`` is the FID feature size.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, features: Sequence[int] = DEFAULT_FEATURES) -> None:
        super().__init__()
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}.")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2 (background included), got {num_classes!r}.")
        features = tuple(int(f) for f in features)
        if len(features) != 6 or min(features) < 1:
            raise ValueError(f"features must be 6 positive ints (BasicUNet), got {features}.")
        from monai.networks.nets import BasicUNet

        self.in_channels, self.num_classes, self.features = in_channels, num_classes, features
        self.unet = BasicUNet(spatial_dims=2, in_channels=in_channels, out_channels=num_classes, features=features,
                              norm=("batch", {"affine": True}))
        self.info: dict[str, Any] = {}

    @property
    def encoder(self) -> SliceEncoder:
        """Slice feature network for FID / MMD (shares weights and train/eval mode with this segmenter)."""
        return SliceEncoder(self.unet).train(self.training)

    @property
    def feature_dim(self) -> int:
        return self.features[4]

    def config(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "num_classes": self.num_classes, "features": list(self.features),
                "architecture": "monai.networks.nets.BasicUNet(spatial_dims=2, norm=batch)", "info": self.info}

    def slice_logits(self, slices: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` float slices in [0, 1] -> ``(B, K, h, w)`` logits."""
        return self.unet(slices)

    @torch.no_grad()
    def forward(self, volumes: torch.Tensor, *, batch_size: int = 128) -> torch.Tensor:
        """Segment volumes: the mean of the softmax maps of the three slicing planes.

        Args:
            volumes: float ``(N, C, H, W, D)`` in [0, 1].
            batch_size: slices per forward pass.

        Returns:
            float32 class probabilities ``(N, K, H, W, D)``.
        """
        if volumes.ndim != 5 or volumes.shape[1] != self.in_channels:
            raise ValueError(
                f"volumes must be (N, {self.in_channels}, H, W, D), got {tuple(volumes.shape)}.")
        was_training = self.training
        self.eval()
        dev = next(self.parameters()).device
        total = torch.zeros(volumes.shape[0], self.num_classes, *volumes.shape[2:])
        for plane in PLANES:
            sl = plane_slices(volumes.float(), plane)
            probs = torch.cat([self.slice_logits(sl[i:i + batch_size].to(dev)).softmax(1).cpu()
                               for i in range(0, sl.shape[0], batch_size)])
            total += plane_stack(probs, volumes.shape[0], plane)
        self.train(was_training)
        return total / len(PLANES)

    # ------------------------------------------------------------------ IO
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``segmenter.safetensors`` + ``segmenter.json`` into ``directory``; returns the weights path."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_write(directory / WEIGHTS_NAME, suffix=".safetensors") as tmp:
            save_file(state, str(tmp), metadata={"format": "pt", "library": "duodiff"})
        with atomic_write(directory / CONFIG_NAME, suffix=".json") as tmp:
            tmp.write_text(json.dumps(self.config(), indent=2, sort_keys=True) + "\n")
        return directory / WEIGHTS_NAME

    @classmethod
    def load(cls, directory: str | os.PathLike) -> SliceSegmenter:
        """Load a segmenter written by :meth:`save` (strictly, safetensors only)."""
        from .serialization import load_state_dict_strict

        directory = Path(directory)
        cfg_path = directory / CONFIG_NAME
        if not cfg_path.is_file():
            raise FileNotFoundError(
                f"No {CONFIG_NAME!r} in {str(directory)!r}. Pass a folder written by SliceSegmenter.save() "
                "(`duodiff evaluate` writes one into its --out folder).")
        try:
            cfg = json.loads(cfg_path.read_text())
            seg = cls(int(cfg["in_channels"]), int(cfg["num_classes"]), tuple(cfg["features"]))
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"{str(cfg_path)!r} is not a valid segmenter config: {e}") from e
        load_state_dict_strict(seg, directory / WEIGHTS_NAME, component="segmenter")
        seg.info = dict(cfg.get("info", {}))
        return seg.eval()


def train_segmenter(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int,
    num_steps: int = 400,
    batch_size: int = 32,
    lr: float = 3e-3,
    features: Sequence[int] = DEFAULT_FEATURES,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> SliceSegmenter:
    """Train a :class:`SliceSegmenter` on real pairs (slices of all three planes, Dice + cross-entropy).

    Each step draws ``batch_size`` random slices of one plane (planes in turn). Weight init and slice
    draws are seeded by ``seed`` without touching the global RNG.

    Args:
        images: float ``(N, C, H, W, D)`` in [0, 1].
        labels: int ``(N, 1, H, W, D)`` with ids in ``range(num_classes)``.
        num_classes: label classes including background.
        num_steps: optimiser steps (Adam, cosine-decayed learning rate).
        batch_size: slices per step.
        lr: peak learning rate.
        features: ``BasicUNet`` feature counts.
        seed: seed of weight init and slice sampling.
        device: training device.
        progress: show a tqdm bar.

    Returns:
        the trained segmenter in eval mode, on the CPU, with ``info`` describing the training.
    """
    from monai.losses import DiceCELoss
    from tqdm.auto import tqdm

    if images.ndim != 5 or labels.ndim != 5 or labels.shape[1] != 1 or images.shape[0] != labels.shape[0] \
            or images.shape[2:] != labels.shape[2:]:
        raise ValueError(
            f"images must be (N, C, H, W, D) and labels (N, 1, H, W, D) with the same N and sides, got "
            f"{tuple(images.shape)} and {tuple(labels.shape)}.")
    if images.shape[0] < 1:
        raise ValueError("Cannot train a segmenter on 0 volumes; pass at least one real pair.")
    if labels.is_floating_point():
        raise TypeError(f"labels must be integer class ids, got {labels.dtype}.")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"label ids must be in range(0, {num_classes}), found {int(labels.min())}.."
                         f"{int(labels.max())}. Pass the right num_classes.")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        seg = SliceSegmenter(int(images.shape[1]), num_classes, features)
    seg.to(device).train()
    gen = torch.Generator().manual_seed(seed)
    slices = {p: (plane_slices(images.float(), p), plane_slices(labels.long(), p)) for p in PLANES}
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(seg.parameters(), lr=lr)
    # OneCycleLR divides by its warm-up length (pct_start * total_steps - 1): zero at exactly 10 steps
    pct_start = 0.1 if abs(0.1 * num_steps - 1) > 1e-9 else 0.15
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=num_steps, pct_start=pct_start)
    losses: list[float] = []
    for step in tqdm(range(num_steps), desc="segmenter", disable=not progress):
        x_all, y_all = slices[PLANES[step % len(PLANES)]]
        idx = torch.randint(0, x_all.shape[0], (batch_size,), generator=gen)
        x, y = x_all[idx].to(device), y_all[idx].to(device)
        loss = loss_fn(seg.slice_logits(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.detach().item())
    tail = losses[-max(1, num_steps // 10):]
    seg.info = {"num_train_volumes": int(images.shape[0]), "num_steps": num_steps, "batch_size": batch_size,
                "lr": lr, "seed": seed, "final_loss": sum(tail) / len(tail),
                "loss": "monai.losses.DiceCELoss(softmax)", "planes": list(PLANES)}
    return seg.cpu().eval()

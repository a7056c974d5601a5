"""Slice features of 3D volumes from a 2D feature network (for FID-2.5D and MMD).

A feature network is any ``torch.nn.Module`` mapping a slice batch ``(B, C, h, w)`` with values in
[0, 1] to ``(B, F)`` features (or ``(B, F, h', w')`` maps, which are global-average-pooled). duodiff's
default is :attr:`duodiff.segmenter.SliceSegmenter.encoder`, trained on the real data; a network from
``torch.hub`` can be used instead with :func:`load_hub_feature_network` (opt-in, needs internet or a
local hub folder).
"""

from __future__ import annotations

import torch
from torch import nn

from ..segmenter import PLANES, plane_slices

__all__ = ["slice_features", "volume_features", "HubFeatureNetwork", "load_hub_feature_network"]


@torch.no_grad()
def slice_features(
    volumes: torch.Tensor, network: nn.Module, plane: str, *, batch_size: int = 256
) -> torch.Tensor:
    """Features of every slice of ``volumes`` along ``plane``.

    Args:
        volumes: float ``(N, C, H, W, D)`` in [0, 1].
        network: slices ``(B, C, h, w)`` -> ``(B, F)`` or ``(B, F, h', w')``.
        plane: ``"axial"``, ``"coronal"`` or ``"sagittal"``.
        batch_size: slices per forward pass.

    Returns:
        float64 ``(N * S, F)``, volume-major.
    """
    if not isinstance(network, nn.Module):
        raise TypeError(f"network must be a torch.nn.Module, got {type(network).__name__}.")
    was_training = network.training
    network.eval()
    try:
        dev = next(network.parameters()).device
    except StopIteration:
        dev = torch.device("cpu")
    slices = plane_slices(volumes.float(), plane)
    out = []
    for i in range(0, slices.shape[0], batch_size):
        f = network(slices[i:i + batch_size].to(dev))
        if f.ndim > 2:
            f = f.flatten(2).mean(-1)
        if f.ndim != 2:
            raise ValueError(f"The feature network must return (B, F) or (B, F, h, w) features, got {tuple(f.shape)}.")
        out.append(f.double().cpu())
    network.train(was_training)
    return torch.cat(out)


def volume_features(volumes: torch.Tensor, network: nn.Module, *, batch_size: int = 256) -> torch.Tensor:
    """One feature vector per volume: the mean slice feature of each plane, concatenated.

    Returns:
        float64 ``(N, 3 * F)`` (axial, coronal, sagittal).
    """
    n = volumes.shape[0]
    parts = [slice_features(volumes, network, p, batch_size=batch_size) for p in PLANES]
    return torch.cat([f.reshape(n, -1, f.shape[-1]).mean(1) for f in parts], dim=1)


class HubFeatureNetwork(nn.Module):
    """Adapts an image classifier / encoder (e.g. from ``torch.hub``) to duodiff's slice-feature contract.

    Repeats single-channel slices to ``in_channels``, optionally normalises them with ``mean`` / ``std``,
    and global-average-pools spatial outputs.

    Args:
        network: maps ``(B, in_channels, h, w)`` to ``(B, F)`` or ``(B, F, h', w')``.
        in_channels: channels the network expects (3 for ImageNet-style models).
        mean: per-channel mean subtracted after repeating (e.g. ImageNet ``(0.485, 0.456, 0.406)``).
        std: per-channel std divided by.
    """

    def __init__(self, network: nn.Module, *, in_channels: int = 3, mean: tuple[float, ...] | None = None,
                 std: tuple[float, ...] | None = None) -> None:
        super().__init__()
        self.network, self.in_channels = network, int(in_channels)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) if mean else torch.zeros(1, 1, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) if std else torch.ones(1, 1, 1, 1),
                             persistent=False)

    def forward(self, slices: torch.Tensor) -> torch.Tensor:
        if slices.shape[1] == 1 and self.in_channels != 1:
            slices = slices.repeat(1, self.in_channels, 1, 1)
        f = self.network((slices - self.mean) / self.std)
        return f.flatten(2).mean(-1) if f.ndim > 2 else f


def load_hub_feature_network(spec: str, *, in_channels: int = 3, mean: tuple[float, ...] | None = None,
                             std: tuple[float, ...] | None = None) -> HubFeatureNetwork:
    """Load a feature network with ``torch.hub`` (opt-in; downloads code and weights unless ``local:``).

    Args:
        spec: ``"owner/repo:entrypoint"`` for a GitHub hub repo (e.g.
            ``"Warvito/radimagenet-models:radimagenet_resnet50"``) or ``"local:/path/to/dir:entrypoint"`` for
            a folder with a ``hubconf.py``.
        in_channels, mean, std: see :class:`HubFeatureNetwork`.

    Raises:
        ValueError: ``spec`` is not of the form above.
    """
    source = "github"
    text = spec
    if text.startswith("local:"):
        source, text = "local", text[len("local:"):]
    repo, sep, entry = text.rpartition(":")
    if not sep or not repo or not entry:
        raise ValueError(f"Hub feature network must be 'owner/repo:entrypoint' or 'local:/dir:entrypoint', got "
                         f"{spec!r}.")
    if source == "github":
        net = torch.hub.load(repo, entry, source="github", trust_repo=True, verbose=False)
    else:
        net = torch.hub.load(repo, entry, source="local", verbose=False)
    if not isinstance(net, nn.Module):
        raise TypeError(f"torch.hub entrypoint {spec!r} returned {type(net).__name__}, not a torch.nn.Module.")
    return HubFeatureNetwork(net.eval(), in_channels=in_channels, mean=mean, std=std)

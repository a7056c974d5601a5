"""`DuoSample`: what ``DuoDiffusion.sample`` returns, and how it is written to disk."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import keys
from .io import NIFTI_SUFFIX, NonFiniteError, nnunet_dataset_json, write_json, write_nifti

__all__ = ["DuoSample", "sample_name"]


def sample_name(seed: int, prefix: str = "duodiff") -> str:
    """The case name of the sample made from ``seed`` (``<prefix>_s<seed>``)."""
    return f"{prefix}_s{int(seed):010d}"


@dataclass
class DuoSample:
    """Paired synthetic volumes.

    Attributes:
        images: float32 ``(N, C, H, W, D)`` in ``[0, 1]``.
        labels: int64 ``(N, 1, H, W, D)`` with ids in ``range(len(label_names))``.
        affine: float64 ``(4, 4)`` voxel-to-RAS-mm matrix shared by all samples.
        spacing: voxel size in mm.
        label_names: class names, background first.
        seeds: the seed of each sample; sample ``i`` is reproduced by ``sample(1, seed=seeds[i])``.
        report: free-form facts about how the samples were made (e.g. QC retries).
        decode: how each stage's latents were decoded, ``{"label": path, "image": path}`` with ``path``
            ``"whole"`` (exact) or ``"tiled h x w x d, overlap o, halo k"`` (approximate); see
            :func:`duodiff.decoding.describe_decode`. :meth:`save` writes it into every NIfTI header
            (``descrip``).
    """

    images: torch.Tensor
    labels: torch.Tensor
    affine: np.ndarray
    spacing: tuple[float, float, float]
    label_names: tuple[str, ...]
    seeds: list[int]
    report: dict[str, Any] = field(default_factory=dict)
    decode: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        return (
            f"DuoSample(n={len(self)}, images={tuple(self.images.shape)} {self.images.dtype}, "
            f"labels={tuple(self.labels.shape)} {self.labels.dtype}, spacing={self.spacing}, "
            f"label_names={list(self.label_names)})"
        )

    def names(self, prefix: str = "duodiff") -> list[str]:
        """Case names used by :meth:`save`."""
        return [sample_name(s, prefix) for s in self.seeds]

    def to_dicts(self) -> list[dict[str, Any]]:
        """MONAI-style dicts ``{"image": MetaTensor (C,H,W,D), "label": MetaTensor (1,H,W,D), ...}``."""
        from monai.data import MetaTensor

        affine = torch.as_tensor(self.affine, dtype=torch.float64)
        return [
            {
                keys.IMAGE: MetaTensor(self.images[i], affine=affine.clone()),
                keys.LABEL: MetaTensor(self.labels[i], affine=affine.clone()),
                keys.IS_SYNTHETIC: True,
                keys.SEED: int(self.seeds[i]),
            }
            for i in range(len(self))
        ]

    def _check_finite(self, out: Path) -> None:
        for what, vol in (("images", self.images), ("labels", self.labels)):
            if not vol.is_floating_point():
                continue
            finite = torch.isfinite(vol.detach()).flatten(1).all(1)
            if not bool(finite.all()):
                bad = [int(self.seeds[i]) for i in torch.nonzero(~finite).flatten().tolist()]
                raise NonFiniteError(
                    f"DuoSample.save: {len(bad)} of {len(self)} {what} hold NaN/Inf values (seeds {bad}); nothing "
                    f"was written to {str(out)!r}. Low-precision sampling overflowed or the model is broken: "
                    "sample again with dtype=None (float32) or dtype='bfloat16'."
                )

    def _description(self, i: int, stage: str) -> str:
        path = self.decode.get(stage)
        text = f"duodiff seed={int(self.seeds[i])}" + (f" decode={path}" if path else "")
        return text[:80]

    def save(
        self,
        out_dir: str | os.PathLike,
        *,
        prefix: str = "duodiff",
        channel_names: Sequence[str] | None = None,
    ) -> list[str]:
        """Write NIfTI pairs in nnU-Net raw naming and (re)write ``dataset.json``.

        ``imagesTr/<name>_0000.nii.gz`` (one file per image channel) and ``labelsTr/<name>.nii.gz``.
        Every file is written atomically; existing cases in ``out_dir`` are kept and counted. Each NIfTI
        header's ``descrip`` records the seed and the decode path (:attr:`decode`).

        Returns:
            the case names written.

        Raises:
            NonFiniteError: an image or label holds NaN/Inf; checked before anything is written, so the
                folder is left exactly as it was.
        """
        out = Path(out_dir)
        self._check_finite(out)
        images_dir, labels_dir = out / "imagesTr", out / "labelsTr"
        try:
            images_dir.mkdir(parents=True, exist_ok=True)
            labels_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(f"Cannot create output folders in {str(out)!r}: {e}. Choose a writable --out.") from e
        n_ch = int(self.images.shape[1])
        channel_names = list(channel_names or (["MRI"] if n_ch == 1 else [f"MRI_{c}" for c in range(n_ch)]))
        label_dtype = np.uint8 if len(self.label_names) <= 255 else np.int16
        names = self.names(prefix)
        for i, name in enumerate(names):
            for c in range(n_ch):
                img = self.images[i, c].detach().float().cpu().numpy().astype(np.float32)
                write_nifti(images_dir / f"{name}_{c:04d}{NIFTI_SUFFIX}", img, self.affine,
                            description=self._description(i, "image"))
            lab = self.labels[i, 0].detach().cpu().numpy().astype(label_dtype)
            write_nifti(labels_dir / f"{name}{NIFTI_SUFFIX}", lab, self.affine,
                        description=self._description(i, "label"))
        num = len(list(labels_dir.glob(f"*{NIFTI_SUFFIX}")))
        meta = nnunet_dataset_json(
            label_names=self.label_names,
            num_training=num,
            channel_names=channel_names,
            name="duodiff synthetic",
            description="Synthetic image/label pairs generated by duodiff",
        )
        write_json(out / "dataset.json", meta)
        return names

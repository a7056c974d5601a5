"""Train a MONAI segmentation UNet on real + synthetic pairs, two ways.

1. ``ConcatDataset([real, synthetic])`` + ``duodiff.MixedBatchSampler`` (exactly 1 synthetic sample per batch).
2. ``duodiff.mix_loaders``: wrap an existing real DataLoader; synthetic pairs stream from a background pool.

Defaults run in about a minute on a laptop CPU: phantom "real" data and an untrained tiny model.
Point it at your own data and model:

    python examples/mix_real_and_synthetic.py --real /data/Task04_Hippocampus --model ./hippocampus-model \
        --steps 50 --iterations 200

``--real`` is a folder with imagesTr/ and labelsTr/ (MSD or nnU-Net layout); ``--model`` a folder written by
``DuoDiffusion.save_pretrained`` or a Hub repo id.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from monai.losses import DiceLoss
from monai.networks.nets import UNet
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    RandFlipd,
    ResizeWithPadOrCropd,
    ScaleIntensityd,
)
from torch.utils.data import ConcatDataset

from duodiff import DuoDiffusion, MixedBatchSampler, SyntheticPairDataset, mix_loaders
from duodiff.data import mark_real
from duodiff.data.folders import find_cases
from duodiff.io import write_nifti
from duodiff.testing import phantom_pair, tiny_pipeline


def phantom_folder(n: int = 8) -> Path:
    """Write ``n`` phantom pairs in MSD layout to a temporary folder (stand-in for real data)."""
    root = Path(tempfile.mkdtemp(prefix="duodiff-real-"))
    for i in range(n):
        image, label = phantom_pair((16, 16, 16), num_classes=3, seed=i)
        write_nifti(root / "imagesTr" / f"case_{i:03d}.nii.gz", image, np.diag([1.0, 1.0, 1.0, 1.0]))
        write_nifti(root / "labelsTr" / f"case_{i:03d}.nii.gz", label, np.diag([1.0, 1.0, 1.0, 1.0]))
    return root


def train(loader, num_classes: int, iterations: int, desc: str) -> None:
    net = UNet(spatial_dims=3, in_channels=1, out_channels=num_classes, channels=(8, 16, 32), strides=(2, 2))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    dice = DiceLoss(to_onehot_y=True, softmax=True, reduction="none")
    step = 0
    while step < iterations:
        for batch in loader:
            is_syn = batch["is_synthetic"]
            per_sample = dice(net(batch["image"]), batch["label"]).flatten(1).mean(1)
            loss = (per_sample * torch.where(is_syn, 0.5, 1.0)).mean()  # synthetic samples count half
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            print(f"[{desc}] step {step:3d}  batch {len(is_syn)} ({int(is_syn.sum())} synthetic)  loss {loss:.3f}")
            if step == iterations:
                return


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--real", type=Path, default=None, help="real data folder (default: phantoms)")
    p.add_argument("--model", default=None, help="duodiff model folder or Hub id (default: untrained tiny)")
    p.add_argument("--steps", type=int, default=2, help="denoising steps per stage")
    p.add_argument("--iterations", type=int, default=4, help="training steps per method")
    args = p.parse_args()

    pipe = DuoDiffusion.from_pretrained(args.model) if args.model else tiny_pipeline()
    shape = tuple(pipe.config.volume_shape)
    real_dir = args.real or phantom_folder()
    files = [{"image": str(c.images[0]), "label": str(c.label)} for c in find_cases(real_dir)]
    real_transform = Compose([
        LoadImaged(keys=["image", "label"]),
        EnsureChannelFirstd(keys=["image", "label"]),
        ScaleIntensityd(keys="image"),                              # synthetic images are in [0, 1]
        ResizeWithPadOrCropd(keys=["image", "label"], spatial_size=shape),  # same size as synthetic pairs
        EnsureTyped(keys="label", dtype=torch.int64),               # synthetic labels are int64
    ])
    augment = RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0)

    # 1. ConcatDataset + MixedBatchSampler: map-style synthetic items (item i = seed i), cached on disk
    real = Dataset(files, transform=Compose([real_transform, augment, mark_real]))
    synthetic = SyntheticPairDataset(pipe, num_samples=64, num_inference_steps=args.steps, transform=augment,
                                     cache_dir=Path(tempfile.gettempdir()) / "duodiff-cache")
    data = ConcatDataset([real, synthetic])
    sampler = MixedBatchSampler(data, batch_size=4, synthetic_fraction=0.25, seed=0)
    train(DataLoader(data, batch_sampler=sampler, num_workers=2), pipe.config.num_classes, args.iterations,
          "sampler")

    # 2. mix_loaders: keep your DataLoader, add a stream of fresh synthetic pairs to each batch
    real_loader = DataLoader(Dataset(files, transform=Compose([real_transform, augment])), batch_size=3,
                             shuffle=True, num_workers=2)
    stream = SyntheticPairDataset(pipe, num_samples=None, num_inference_steps=args.steps, transform=augment)
    train(mix_loaders(real_loader, stream, synthetic_fraction=0.25), pipe.config.num_classes, args.iterations,
          "mix_loaders")


if __name__ == "__main__":
    main()

"""Real training loops on real (phantom NIfTI) + synthetic pairs: MONAI, TorchIO and plain PyTorch.

Each loop runs a few optimisation steps of a small segmentation network with the tiny preset as the
synthetic source, checks the per-batch synthetic counts and that the network actually trained.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import ConcatDataset, TensorDataset

from duodiff import MixedBatchSampler, SyntheticPairDataset, mix_loaders
from duodiff.data import mark_real
from duodiff.io import write_nifti
from duodiff.testing import phantom_pair

SHAPE = (16, 16, 16)
STEPS = 2
# DataLoader(timeout=...): a stuck worker fails its test with an error instead of hanging the suite
WORKER_TIMEOUT_S = 300


def _pool_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "duodiff-synthetic-pool" and t.is_alive()]


@pytest.fixture(scope="module")
def real_files(tmp_path_factory) -> list[dict[str, str]]:
    """Four phantom (image, label) pairs written as NIfTI with a non-trivial affine."""
    folder = tmp_path_factory.mktemp("real")
    affine = np.diag([1.5, 0.75, 2.0, 1.0])
    files = []
    for i in range(4):
        image, label = phantom_pair(SHAPE, num_classes=3, seed=i)
        write_nifti(folder / f"img_{i}.nii.gz", image, affine)
        write_nifti(folder / f"lab_{i}.nii.gz", label, affine)
        files.append({"image": str(folder / f"img_{i}.nii.gz"), "label": str(folder / f"lab_{i}.nii.gz")})
    return files


def unet():
    from monai.networks.nets import UNet

    torch.manual_seed(0)  # test-local determinism of the network init only
    return UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8), strides=(2,), num_res_units=0)


def train_steps(net, batches, loss_fn, max_steps=3):
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in net.parameters()]
    losses, flags = [], []
    for step, (x, y, is_syn) in enumerate(batches):
        if step == max_steps:
            break
        opt.zero_grad()
        loss = loss_fn(net(x), y, is_syn)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        flags.append(is_syn.tolist())
    assert all(np.isfinite(losses)) and len(losses) == max_steps
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    return flags


def test_monai_loop_with_mixed_batch_sampler(real_files, tiny_pipe):
    """monai Dataset + dict transforms + DataLoader(num_workers=2) + UNet + DiceLoss on real + synthetic."""
    from monai.data import DataLoader, Dataset
    from monai.losses import DiceLoss
    from monai.transforms import Compose, EnsureChannelFirstd, EnsureTyped, LoadImaged, RandFlipd, ScaleIntensityd

    real = Dataset(real_files, transform=Compose([
        LoadImaged(keys=["image", "label"]),
        EnsureChannelFirstd(keys=["image", "label"]),
        ScaleIntensityd(keys="image"),
        EnsureTyped(keys="label", dtype=torch.int64),
        mark_real,
    ]))
    synthetic = SyntheticPairDataset(tiny_pipe, num_samples=8, num_inference_steps=STEPS,
                                     transform=RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0))
    data = ConcatDataset([real, synthetic])
    sampler = MixedBatchSampler(data, batch_size=3, synthetic_fraction=1 / 3, seed=0)
    loader = DataLoader(data, batch_sampler=sampler, num_workers=2, timeout=WORKER_TIMEOUT_S)
    dice = DiceLoss(to_onehot_y=True, softmax=True)
    batches = []
    for batch in loader:
        assert batch["image"].shape == (3, 1, *SHAPE) and batch["label"].dtype == torch.int64
        assert batch["image"].affine.shape == (3, 4, 4)  # per-sample affines survive collation
        batches.append((batch["image"], batch["label"], batch["is_synthetic"]))
    assert len(batches) == len(sampler) == 2  # 4 real samples, 2 per batch (+1 synthetic)
    flags = train_steps(unet(), batches, lambda out, y, _: dice(out, y), max_steps=2)
    assert [sum(f) for f in flags] == [1, 1]
    np.testing.assert_allclose(batches[0][0].affine[0].numpy(), np.diag([1.5, 0.75, 2.0, 1.0]))


def test_monai_loop_with_streaming_mix_loaders(real_files, tiny_pipe):
    """The real MONAI DataLoader (2 workers) is wrapped; synthetic pairs stream from the background pool."""
    from monai.data import DataLoader, Dataset
    from monai.losses import DiceLoss
    from monai.transforms import Compose, EnsureChannelFirstd, EnsureTyped, LoadImaged, ScaleIntensityd

    real = Dataset(real_files, transform=Compose([
        LoadImaged(keys=["image", "label"]),
        EnsureChannelFirstd(keys=["image", "label"]),
        ScaleIntensityd(keys="image"),
        EnsureTyped(keys="label", dtype=torch.int64),
    ]))
    real_loader = DataLoader(real, batch_size=3, num_workers=2, shuffle=True, timeout=WORKER_TIMEOUT_S)
    stream = SyntheticPairDataset(tiny_pipe, num_samples=None, num_inference_steps=STEPS, pool_size=4)
    with mix_loaders(real_loader, stream, synthetic_fraction=0.25) as mixed:
        assert len(mixed) == 2
        batches = [(b["image"], b["label"], b["is_synthetic"]) for b in mixed]
    assert not _pool_threads()  # closing the loader stopped the stream's generation thread
    dice = DiceLoss(to_onehot_y=True, softmax=True, reduction="none")

    def weighted(out, y, is_syn):  # synthetic samples count half
        per_sample = dice(out, y).flatten(1).mean(1)
        return (per_sample * torch.where(is_syn, 0.5, 1.0)).mean()

    assert [b[0].shape[0] for b in batches] == [4, 1]  # 3 real + 1; round_half_up(0.25 * 1 / 0.75) = 0
    flags = train_steps(unet(), batches, weighted, max_steps=2)
    assert flags == [[False, False, False, True], [False]]


def test_torchio_loop(real_files, tiny_pipe):
    tio = pytest.importorskip("torchio")
    from monai.losses import DiceLoss

    def to_subject(item):  # a SyntheticPairDataset item -> tio.Subject
        return tio.Subject(
            image=tio.ScalarImage(tensor=item["image"].as_tensor(), affine=item["image"].affine.numpy()),
            label=tio.LabelMap(tensor=item["label"].as_tensor(), affine=item["label"].affine.numpy()),
            is_synthetic=True,
        )

    augment = tio.Compose([tio.RescaleIntensity(out_min_max=(0, 1)), tio.RandomFlip(axes=(0,))])
    real = tio.SubjectsDataset(
        [tio.Subject(image=tio.ScalarImage(f["image"]), label=tio.LabelMap(f["label"]), is_synthetic=False)
         for f in real_files],
        transform=augment,
    )
    synthetic = SyntheticPairDataset(tiny_pipe, num_samples=4, num_inference_steps=STEPS,
                                     transform=lambda d: augment(to_subject(d)))
    data = ConcatDataset([real, synthetic])
    loader = tio.SubjectsLoader(data, batch_sampler=MixedBatchSampler(data, batch_size=4, synthetic_fraction=0.25))
    dice = DiceLoss(to_onehot_y=True, softmax=True)
    batches = [(b["image"][tio.DATA].float(), b["label"][tio.DATA].long(), b["is_synthetic"]) for b in loader]
    flags = train_steps(unet(), batches, lambda out, y, _: dice(out, y), max_steps=2)
    assert [sum(f) for f in flags] == [1, 1]


def test_plain_pytorch_loop(tiny_pipe):
    """TensorDataset of (image, label) tuples; the merged batches stay tuples with a flag appended."""
    from torch.utils.data import DataLoader

    images, labels = [], []
    for i in range(6):
        image, label = phantom_pair(SHAPE, num_classes=3, seed=10 + i)
        images.append(image / image.max())
        labels.append(label)
    real = TensorDataset(torch.from_numpy(np.stack(images))[:, None].float(),
                         torch.from_numpy(np.stack(labels))[:, None].long())
    real_loader = DataLoader(real, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(0))
    stream = SyntheticPairDataset(tiny_pipe, num_samples=None, num_inference_steps=STEPS)
    with mix_loaders(real_loader, stream, synthetic_fraction=0.25, keys=("image", "label")) as mixed:
        batches = list(mixed)
        assert _pool_threads()  # the stream lives on between epochs until the loader is closed
    assert not _pool_threads()
    x, y, is_syn = batches[0]
    assert isinstance(x, torch.Tensor) and type(x) is torch.Tensor  # plain tensors, like the real loader's
    assert x.shape == (4, 1, *SHAPE) and y.dtype == torch.long

    ce = torch.nn.CrossEntropyLoss(reduction="none")

    def weighted(out, y, is_syn):
        per_sample = ce(out, y[:, 0]).flatten(1).mean(1)
        return (per_sample * torch.where(is_syn, 0.5, 1.0)).mean()

    flags = train_steps(unet(), batches, weighted, max_steps=2)
    assert flags == [[False, False, False, True]] * 2


def test_synthetic_dataloader_with_workers_feeds_mix_loaders(tiny_pipe):
    """A synthetic DataLoader (map-style, 2 workers) as the source: rows are split across real batches."""
    from torch.utils.data import DataLoader

    real = DataLoader(TensorDataset(torch.rand(6, 1, *SHAPE), torch.zeros(6, 1, *SHAPE, dtype=torch.long)),
                      batch_size=3)
    syn = DataLoader(SyntheticPairDataset(tiny_pipe, num_samples=4, num_inference_steps=STEPS), batch_size=2,
                     num_workers=2, timeout=WORKER_TIMEOUT_S)
    with mix_loaders(real, syn, synthetic_fraction=0.4, keys=("image", "label")) as mixed:
        sizes = [(x.shape[0], int(f.sum())) for x, _, f in mixed]
        assert mixed.supply._iterator is not None  # workers stay up between epochs ...
    assert mixed.supply._iterator is None  # ... until the loader is closed
    assert sizes == [(5, 2), (5, 2)]  # round_half_up(0.4 * 3 / 0.6) = 2 synthetic per batch


def test_same_items_across_runs(tiny_pipe, tmp_path: Path):
    """Map-style item i is identical in a fresh dataset, through workers and from the cache."""
    from torch.utils.data import DataLoader

    a = SyntheticPairDataset(tiny_pipe, num_samples=3, num_inference_steps=STEPS, seed=100, cache_dir=tmp_path)
    direct = a[2]
    via_workers = list(DataLoader(a, batch_size=None, num_workers=2, timeout=WORKER_TIMEOUT_S))[2]
    b = SyntheticPairDataset(tiny_pipe, num_samples=3, num_inference_steps=STEPS, seed=100, cache_dir=tmp_path)
    cached = b[2]
    for other in (via_workers, cached):
        assert torch.equal(direct["image"].as_tensor(), other["image"].as_tensor())
        assert torch.equal(direct["label"].as_tensor(), other["label"].as_tensor())
        assert other["seed"] == 102


HIPPO = Path(__file__).resolve().parents[3] / "shared" / "data" / "msd_hippocampus"


@pytest.mark.data
@pytest.mark.skipif(not (HIPPO / "dataset.json").is_file(), reason="needs ../shared/data/msd_hippocampus")
def test_monai_loop_on_real_hippocampus(tiny_pipe):
    """Three real MSD hippocampus MRIs (cropped to the model's 16^3) + synthetic pairs through one MONAI loop."""
    from monai.data import DataLoader, Dataset
    from monai.losses import DiceLoss
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        EnsureTyped,
        LoadImaged,
        ResizeWithPadOrCropd,
        ScaleIntensityd,
    )

    from duodiff.data.folders import find_cases

    files = [{"image": str(c.images[0]), "label": str(c.label)} for c in find_cases(HIPPO)[:3]]
    real = Dataset(files, transform=Compose([
        LoadImaged(keys=["image", "label"]),
        EnsureChannelFirstd(keys=["image", "label"]),
        ScaleIntensityd(keys="image"),
        ResizeWithPadOrCropd(keys=["image", "label"], spatial_size=SHAPE),
        EnsureTyped(keys="label", dtype=torch.int64),
        mark_real,
    ]))
    data = ConcatDataset([real, SyntheticPairDataset(tiny_pipe, num_samples=4, num_inference_steps=STEPS)])
    sampler = MixedBatchSampler(data, batch_size=2, synthetic_fraction=0.5)
    dice = DiceLoss(to_onehot_y=True, softmax=True)
    batches = [(b["image"], b["label"], b["is_synthetic"]) for b in DataLoader(data, batch_sampler=sampler)]
    assert len(batches) == 3 and all(int(f.sum()) == 1 for _, _, f in batches)
    assert set(torch.unique(torch.cat([y for _, y, _ in batches])).tolist()) <= {0, 1, 2}
    train_steps(unet(), batches, lambda out, y, _: dice(out, y), max_steps=3)

"""SyntheticPairDataset: map-style determinism, cache, streaming pool, worker/rank seed streams, from_folder."""

from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from torch.utils.data import DataLoader, IterableDataset

from duodiff import SyntheticPairDataset
from duodiff.data.generation import check_device_usable as _check_device_usable
from duodiff.data.synthetic import EPOCH_SEED_STRIDE, StreamingSyntheticPairDataset
from duodiff.io import read_nifti, write_json, write_nifti
from duodiff.testing import phantom_pair
from duodiff.threads import GENERATION_THREADS, intra_op_threads

STEPS = 2


@pytest.fixture(scope="module")
def reference(tiny_pipe):
    """pipe.sample(1, seed=s) for s in 0..5 with the dataset's generation thread count: what item s must equal."""
    with intra_op_threads(GENERATION_THREADS):
        outs = [tiny_pipe.sample(1, seed=s, num_inference_steps=STEPS, progress=False) for s in range(6)]
    return {s: (o.images[0], o.labels[0]) for s, o in enumerate(outs)}


def same_item(item, ref) -> bool:
    return torch.equal(item["image"].as_tensor(), ref[0]) and torch.equal(item["label"].as_tensor(), ref[1])


def first(iterable, n):
    return list(itertools.islice(iter(iterable), n))


# ---------------------------------------------------------------------------------------------- map-style
def test_map_item_is_the_pair_of_seed_plus_index(tiny_pipe, reference):
    ds = SyntheticPairDataset(tiny_pipe, num_samples=4, seed=2, num_inference_steps=STEPS)
    assert type(ds) is SyntheticPairDataset and not isinstance(ds, IterableDataset)
    assert len(ds) == 4 and ds.seed_of(1) == 3
    item = ds[1]
    assert set(item) == {"image", "label", "is_synthetic", "seed"}
    assert item["is_synthetic"] is True and item["seed"] == 3
    assert isinstance(item["image"], MetaTensor) and isinstance(item["label"], MetaTensor)
    assert item["image"].dtype == torch.float32 and item["label"].dtype == torch.int64
    assert tuple(item["image"].shape) == (1, 16, 16, 16) and tuple(item["label"].shape) == (1, 16, 16, 16)
    np.testing.assert_allclose(item["image"].affine.numpy(), tiny_pipe.affine)
    np.testing.assert_allclose(item["label"].affine.numpy(), tiny_pipe.affine)
    assert np.allclose(np.diag(tiny_pipe.affine)[:3], (1.5, 0.75, 2.0))
    assert same_item(item, reference[3])
    assert same_item(ds[-1], reference[5])  # negative index like a sequence


def test_map_index_errors(tiny_pipe):
    ds = SyntheticPairDataset(tiny_pipe, num_samples=3, num_inference_steps=STEPS)
    with pytest.raises(IndexError, match="out of range for a dataset of 3"):
        ds[3]
    with pytest.raises(TypeError, match="index must be an int"):
        ds["0"]


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        (dict(num_samples=0), ValueError, "num_samples must be a positive int"),
        (dict(num_samples=2.5), ValueError, "num_samples must be a positive int"),
        (dict(num_samples=2, seed=-1), ValueError, "seed must be an int >= 0"),
        (dict(num_samples=2, transform=3), TypeError, "transform must be callable"),
        (dict(num_samples=None, cache_dir="x"), ValueError, "cache_dir works with map-style"),
        (dict(num_samples=None, pool_size=0), ValueError, "pool_size must be a positive int"),
        (dict(num_samples=None, rank=0), ValueError, "rank and world_size together"),
        (dict(num_samples=None, rank=2, world_size=2), ValueError, r"rank must be an int in \[0, 2\)"),
        (dict(num_samples=4, rank=0, world_size=2), ValueError, "DistributedSampler"),
        (dict(num_samples=2, num_inference_steps=100000), ValueError, "num_inference_steps"),
    ],
)
def test_validation(tiny_pipe, kwargs, err, match):
    with pytest.raises(err, match=match):
        SyntheticPairDataset(tiny_pipe, **kwargs)


def test_pipe_must_be_a_model():
    with pytest.raises(TypeError, match="pipe must be a DuoDiffusion.*from_folder"):
        SyntheticPairDataset("model_dir", num_samples=2)


def test_transform_is_applied(tiny_pipe):
    def add_one(d):
        return {**d, "image": d["image"] + 1.0, "tag": "t"}

    ds = SyntheticPairDataset(tiny_pipe, num_samples=2, num_inference_steps=STEPS, transform=add_one)
    item = ds[0]
    assert item["tag"] == "t" and float(item["image"].min()) >= 1.0


def test_items_are_the_same_in_dataloader_workers(tiny_pipe, reference):
    ds = SyntheticPairDataset(tiny_pipe, num_samples=4, num_inference_steps=STEPS)
    loader = DataLoader(ds, batch_size=None, num_workers=2, shuffle=False, timeout=300)
    items = list(loader)
    assert [it["seed"] for it in items] == [0, 1, 2, 3]
    for it in items:
        assert same_item(it, reference[it["seed"]])


@pytest.mark.parametrize("caller_threads", [1, 2, 3])
def test_item_does_not_depend_on_the_callers_thread_count(tiny_pipe, reference, caller_threads):
    """The promise behind worker == main == cache: generation pins its own intra-op thread count."""
    ds = SyntheticPairDataset(tiny_pipe, num_samples=2, num_inference_steps=STEPS)
    with intra_op_threads(caller_threads):
        item = ds[1]
        assert torch.get_num_threads() == caller_threads  # restored after generating
    assert same_item(item, reference[1])


def test_num_threads_is_validated(tiny_pipe):
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_threads must be a positive int or None"):
            SyntheticPairDataset(tiny_pipe, num_samples=1, num_threads=bad)


def test_intra_op_threads_is_per_python_thread():
    """Pinning threads in a generation thread leaves a training loop beside it alone."""
    before = torch.get_num_threads()
    seen = []

    def generate():
        with intra_op_threads(1):
            seen.append(torch.get_num_threads())

    with intra_op_threads(2):
        t = threading.Thread(target=generate)
        t.start()
        t.join()
        assert torch.get_num_threads() == 2
    assert seen[0] == 1 and torch.get_num_threads() == before


def test_spawn_worker_generates_the_same_items(tiny_pipe, reference):
    """The setup recommended for CUDA models: spawned workers (the dataset is pickled, never the cache)."""
    ds = SyntheticPairDataset(tiny_pipe, num_samples=2, num_inference_steps=STEPS)
    loader = DataLoader(ds, batch_size=None, num_workers=1, multiprocessing_context="spawn")
    items = list(loader)
    assert [it["seed"] for it in items] == [0, 1]
    assert same_item(items[1], reference[1])


# ---------------------------------------------------------------------------------------------- cache
def test_cache_writes_safetensors_and_hits_are_identical(tiny_pipe, reference, tmp_path, monkeypatch):
    ds = SyntheticPairDataset(tiny_pipe, num_samples=3, num_inference_steps=STEPS, cache_dir=tmp_path)
    fresh = ds[1]
    path = ds.cache_path(1)
    assert path.is_file() and path.parent.parent == tmp_path and path.suffix == ".safetensors"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary files left behind
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:  # a plain safetensors file, no pickle
        assert set(f.keys()) == {"image", "label", "affine"}
        assert f.metadata()["seed"] == "1"

    def no_generation(seeds):
        raise AssertionError(f"generated {seeds} although the pair was cached")

    again = SyntheticPairDataset(tiny_pipe, num_samples=3, num_inference_steps=STEPS, cache_dir=tmp_path)
    monkeypatch.setattr(again, "_generate", no_generation)
    hit = again[1]
    assert same_item(hit, reference[1]) and same_item(fresh, reference[1])
    assert hit["seed"] == 1 and hit["is_synthetic"] is True
    np.testing.assert_array_equal(hit["image"].affine.numpy(), fresh["image"].affine.numpy())
    with pytest.raises(AssertionError, match="generated"):
        again[2]


def test_cache_key_covers_generation_settings(tiny_pipe, tmp_path):
    a = SyntheticPairDataset(tiny_pipe, num_samples=1, num_inference_steps=2, cache_dir=tmp_path)
    b = SyntheticPairDataset(tiny_pipe, num_samples=1, num_inference_steps=3, cache_dir=tmp_path)
    assert a.cache_dir != b.cache_dir


def test_concurrent_writers_share_one_cache(tiny_pipe, reference, tmp_path):
    ds = SyntheticPairDataset(tiny_pipe, num_samples=1, num_inference_steps=STEPS, cache_dir=tmp_path)
    with ThreadPoolExecutor(4) as pool:
        items = list(pool.map(lambda _: ds[0], range(4)))
    assert all(same_item(it, reference[0]) for it in items)
    assert [p.name for p in ds.cache_dir.iterdir()] == [ds.cache_path(0).name]
    assert same_item(ds[0], reference[0])


def test_cache_filled_by_workers_is_read_back(tiny_pipe, reference, tmp_path):
    ds = SyntheticPairDataset(tiny_pipe, num_samples=3, num_inference_steps=STEPS, cache_dir=tmp_path)
    list(DataLoader(ds, batch_size=None, num_workers=2, timeout=300))
    assert sorted(p.name for p in ds.cache_dir.iterdir()) == sorted(ds.cache_path(s).name for s in range(3))
    assert all(same_item(ds[i], reference[i]) for i in range(3))


def test_cache_keeps_the_seed_of_a_retried_pair(tiny_pipe, tmp_path, monkeypatch):
    """With QC retries (sample_kwargs) the accepted pair may come from another seed: the cache keeps both."""
    ds = SyntheticPairDataset(tiny_pipe, num_samples=1, num_inference_steps=STEPS, cache_dir=tmp_path)
    original = ds._generate

    def retried(seeds):
        return [{**item, "seed": 99} for item in original(seeds)]

    monkeypatch.setattr(ds, "_generate", retried)
    fresh = ds[0]
    monkeypatch.setattr(ds, "_generate", lambda seeds: pytest.fail("should be a cache hit"))
    hit = ds[0]
    assert fresh["seed"] == hit["seed"] == 99 and torch.equal(fresh["image"], hit["image"])


def test_corrupt_cache_file_is_reported(tiny_pipe, tmp_path):
    ds = SyntheticPairDataset(tiny_pipe, num_samples=1, num_inference_steps=STEPS, cache_dir=tmp_path)
    ds.cache_path(0).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="delete it to regenerate"):
        ds[0]


# ---------------------------------------------------------------------------------------------- streaming
def test_streaming_yields_seeds_in_order_and_is_reproducible(tiny_pipe):
    ds = SyntheticPairDataset(tiny_pipe, num_samples=None, seed=10, num_inference_steps=STEPS, pool_size=3,
                              generation_batch_size=2)
    assert type(ds) is StreamingSyntheticPairDataset and isinstance(ds, IterableDataset)
    assert isinstance(ds, SyntheticPairDataset)
    a, b = first(ds, 5), first(ds, 5)
    assert [x["seed"] for x in a] == [10, 11, 12, 13, 14]
    for x, y in zip(a, b):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
        assert x["is_synthetic"] is True and isinstance(x["image"], MetaTensor)


def test_streaming_with_batch_size_one_equals_map_items(tiny_pipe, reference):
    ds = SyntheticPairDataset(tiny_pipe, num_samples=None, num_inference_steps=STEPS, generation_batch_size=1)
    for item in first(ds, 3):
        assert same_item(item, reference[item["seed"]])


def test_streaming_has_no_len_or_index(tiny_pipe):
    ds = SyntheticPairDataset(tiny_pipe, num_samples=None, num_inference_steps=STEPS)
    with pytest.raises(TypeError, match="endless"):
        len(ds)
    with pytest.raises(TypeError, match="cannot be indexed"):
        ds[0]


def test_streaming_set_epoch_gives_fresh_seeds(tiny_pipe):
    ds = SyntheticPairDataset(tiny_pipe, num_samples=None, seed=1, num_inference_steps=STEPS)
    ds.set_epoch(2)
    assert first(ds.seed_stream(), 3) == [1 + 2 * EPOCH_SEED_STRIDE + k for k in range(3)]
    with pytest.raises(ValueError, match="epoch must be an int >= 0"):
        ds.set_epoch(-1)


def _epoch_seeds(loader, ds, epochs, n):
    """Seeds of the first ``n`` items of each epoch of the documented loop ``ds.set_epoch(e); for item in loader``."""
    out = []
    for e in epochs:
        ds.set_epoch(e)
        out.append([int(item["seed"]) for item in first(loader, n)])
    return out


def test_persistent_workers_follow_set_epoch(tiny_pipe):
    """case04: persistent workers keep their dataset copy, yet every epoch gets fresh seeds (shared epoch).

    2 ranks x 2 persistent forked workers: each epoch's seeds are exactly ``e * 2**32 + 0..7`` (no seed repeated
    or skipped over ranks and workers), the same as with fresh workers, and no seed repeats across epochs.
    """
    epochs = [0, 1, 3, 3]
    per_rank = []
    for rank in range(2):
        ds = SyntheticPairDataset(tiny_pipe, num_samples=None, num_inference_steps=STEPS, rank=rank, world_size=2,
                                  generation_batch_size=1, pool_size=1)
        loader = DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True, timeout=300)
        per_rank.append(_epoch_seeds(loader, ds, epochs, 4))
        if rank == 0:  # the same seeds as workers started afresh every epoch
            fresh = DataLoader(ds, batch_size=None, num_workers=2, timeout=300)
            assert _epoch_seeds(fresh, ds, epochs[:3], 4) == per_rank[0][:3]
        del loader
    for i, e in enumerate(epochs):
        assert sorted(per_rank[0][i] + per_rank[1][i]) == [e * EPOCH_SEED_STRIDE + k for k in range(8)]
    assert per_rank[0][2] == per_rank[0][3]  # without a new set_epoch, a new iteration replays the epoch


def test_persistent_spawned_workers_follow_set_epoch(tiny_pipe):
    """Spawned workers get the dataset pickled; the epoch still reaches them (a shared tensor travels by handle)."""
    ds = SyntheticPairDataset(tiny_pipe, num_samples=None, num_inference_steps=STEPS, generation_batch_size=1,
                              pool_size=1)
    loader = DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True, timeout=300,
                        multiprocessing_context="spawn")
    seeds = _epoch_seeds(loader, ds, [0, 2], 2)
    assert seeds == [[0, 1], [2 * EPOCH_SEED_STRIDE, 2 * EPOCH_SEED_STRIDE + 1]]


def test_ranks_have_disjoint_streams_that_cover_every_seed(tiny_pipe):
    streams = [
        first(SyntheticPairDataset(tiny_pipe, num_samples=None, num_inference_steps=STEPS, rank=r,
                                   world_size=2).seed_stream(), 6)
        for r in range(2)
    ]
    assert streams == [[0, 2, 4, 6, 8, 10], [1, 3, 5, 7, 9, 11]]


def test_workers_and_ranks_split_the_stream(tiny_pipe):
    """2 ranks x 2 DataLoader workers: 4 streams, no seed twice, none missing."""
    seeds = []
    for rank in range(2):
        ds = SyntheticPairDataset(tiny_pipe, num_samples=None, num_inference_steps=STEPS, rank=rank, world_size=2,
                                  generation_batch_size=2, pool_size=2)
        loader = DataLoader(ds, batch_size=None, num_workers=2, timeout=300)
        seeds += [item["seed"] for item in first(loader, 6)]
    assert sorted(seeds) == list(range(12))


def test_streaming_pool_is_bounded(tiny_pipe, monkeypatch):
    ds = SyntheticPairDataset(tiny_pipe, num_samples=None, num_inference_steps=STEPS, pool_size=2,
                              generation_batch_size=1)
    made = []
    original = ds._generate

    def counting(seeds):
        made.extend(seeds)
        return original(seeds)

    monkeypatch.setattr(ds, "_generate", counting)
    it = iter(ds)
    next(it)
    time.sleep(1.5)  # give the thread time to overfill if it were unbounded
    assert len(made) <= 1 + 2 + 1  # consumed + pool + the batch waiting to be put
    it.close()


def test_streaming_thread_error_is_raised_not_hung(tiny_pipe):
    def broken(_):
        raise KeyError("bad transform")

    ds = SyntheticPairDataset(tiny_pipe, num_samples=None, num_inference_steps=STEPS, transform=broken)
    with pytest.raises(RuntimeError, match="background thread.*bad transform"):
        next(iter(ds))


def test_streaming_thread_stops_when_iterator_is_closed(tiny_pipe):
    ds = SyntheticPairDataset(tiny_pipe, num_samples=None, num_inference_steps=STEPS, pool_size=1,
                              generation_batch_size=1)
    it = iter(ds)
    next(it)
    it.close()
    deadline = time.time() + 10
    while time.time() < deadline and any(t.name == "duodiff-synthetic-pool" for t in threading.enumerate()):
        time.sleep(0.05)
    assert not any(t.name == "duodiff-synthetic-pool" for t in threading.enumerate())


def test_cuda_in_forked_worker_is_a_clear_error(monkeypatch):
    class FakePipe:
        device = torch.device("cuda", 0)

    monkeypatch.setattr(torch.cuda, "_is_in_bad_fork", lambda: True)
    with pytest.raises(RuntimeError, match="multiprocessing_context='spawn'.*from_folder"):
        _check_device_usable(FakePipe())


# ---------------------------------------------------------------------------------------------- from_folder
def test_from_folder_reads_sample_output(tiny_pipe, tmp_path):
    out = tiny_pipe.sample(3, seed=7, num_inference_steps=STEPS, progress=False)
    out.save(tmp_path)
    ds = SyntheticPairDataset.from_folder(tmp_path)
    assert len(ds) == 3 and "folder=" in repr(ds)
    seeds = [ds[i]["seed"] for i in range(3)]
    assert seeds == [7, 8, 9]
    item = ds[1]
    assert isinstance(item["image"], MetaTensor) and item["image"].dtype == torch.float32
    assert item["label"].dtype == torch.int64 and item["is_synthetic"] is True
    assert torch.equal(item["image"].as_tensor(), out.images[1])
    assert torch.equal(item["label"].as_tensor(), out.labels[1])
    np.testing.assert_allclose(item["image"].affine.numpy(), out.affine)
    assert list(DataLoader(ds, batch_size=3))[0]["image"].shape == (3, 1, 16, 16, 16)


def test_from_folder_reads_msd_layout_and_unseeded_names(tmp_path):
    image, label = phantom_pair((8, 8, 8), seed=0)
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    write_nifti(tmp_path / "imagesTr" / "case_a.nii.gz", image, affine)
    write_nifti(tmp_path / "labelsTr" / "case_a.nii.gz", label, affine)
    write_json(tmp_path / "dataset.json", {"labels": {"0": "background", "1": "a", "2": "b"}})
    item = SyntheticPairDataset.from_folder(tmp_path)[0]
    assert item["seed"] == -1
    np.testing.assert_array_equal(item["label"][0].numpy(), label)
    np.testing.assert_allclose(item["image"].affine.numpy(), read_nifti(tmp_path / "imagesTr/case_a.nii.gz")[1])


def test_from_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="must contain .imagesTr. and .labelsTr."):
        SyntheticPairDataset.from_folder(tmp_path)
    image, label = phantom_pair((8, 8, 8), seed=0)
    write_nifti(Path(tmp_path) / "labelsTr" / "x.nii.gz", label, np.eye(4))
    (tmp_path / "imagesTr").mkdir()
    with pytest.raises(FileNotFoundError, match="x_0000.nii.gz"):
        SyntheticPairDataset.from_folder(tmp_path)

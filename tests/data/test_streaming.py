"""StreamingSyntheticPairDataset and PairFolderDataset are ordinary classes; the one-class spelling still works.

Seeds, workers, epochs and errors of the stream are tested in data/test_synthetic.py (through the one-class
spelling, as users write it); this module checks the classes themselves.
"""

from __future__ import annotations

import itertools
import threading

import pytest
import torch
from torch.utils.data import IterableDataset

from duodiff import SyntheticPairDataset
from duodiff.data import PairFolderDataset, StreamingSyntheticPairDataset

STEPS = 2


def test_stream_is_constructed_directly(tiny_pipe):
    ds = StreamingSyntheticPairDataset(tiny_pipe, seed=4, num_inference_steps=STEPS, dtype=None, pool_size=2,
                                       generation_batch_size=1)
    assert isinstance(ds, IterableDataset) and isinstance(ds, SyntheticPairDataset)
    assert "StreamingSyntheticPairDataset(seed=4" in repr(ds) and ds.generation["dtype"] is None
    it = iter(ds)
    assert [item["seed"] for item in itertools.islice(it, 3)] == [4, 5, 6]
    it.close()
    assert not any(t.name == "duodiff-synthetic-pool" for t in threading.enumerate())


def test_one_class_spelling_builds_the_same_stream(tiny_pipe):
    kwargs = dict(seed=3, num_inference_steps=STEPS, dtype=None, generation_batch_size=1, pool_size=1)
    a = SyntheticPairDataset(tiny_pipe, None, **kwargs)
    b = StreamingSyntheticPairDataset(tiny_pipe, **kwargs)
    assert type(a) is type(b) and repr(a) == repr(b)
    for x, y in zip(itertools.islice(a, 2), itertools.islice(b, 2)):
        assert x["seed"] == y["seed"] and torch.equal(x["image"], y["image"])


def test_stream_takes_no_map_style_options(tiny_pipe):
    with pytest.raises(TypeError, match="num_samples"):
        StreamingSyntheticPairDataset(tiny_pipe, num_samples=4)
    with pytest.raises(TypeError, match="cache_dir"):
        StreamingSyntheticPairDataset(tiny_pipe, cache_dir="x")


@pytest.mark.parametrize("option", ["pool_size", "generation_batch_size", "rank"])
def test_map_style_refuses_stream_options(tiny_pipe, option):
    kwargs = {option: 2} | ({"world_size": 4} if option == "rank" else {})
    with pytest.raises(ValueError, match="streaming datasets only.*DistributedSampler"):
        SyntheticPairDataset(tiny_pipe, 4, num_inference_steps=STEPS, **kwargs)


def test_map_style_is_constructed_normally(tiny_pipe):
    ds = SyntheticPairDataset(tiny_pipe, 2, seed=5, num_inference_steps=STEPS, dtype=None)
    assert type(ds) is SyntheticPairDataset and len(ds) == 2 and ds.seed_of(1) == 6
    assert ds.pipe is tiny_pipe and ds.generator.generation is ds.generation
    with pytest.raises(TypeError, match="num_samples"):
        SyntheticPairDataset(tiny_pipe)  # num_samples is required, as before


def test_folder_dataset_is_constructed_directly(tiny_pipe, tmp_path):
    tiny_pipe.sample(2, seed=11, num_inference_steps=STEPS, progress=False).save(tmp_path)
    ds = PairFolderDataset(tmp_path, transform=lambda d: {**d, "tag": 1})
    assert isinstance(ds, SyntheticPairDataset) and not isinstance(ds, IterableDataset)
    assert len(ds) == ds.num_samples == 2 and repr(ds).startswith("PairFolderDataset(folder=")
    assert [ds[i]["seed"] for i in (0, -1)] == [11, 12] and ds[0]["tag"] == 1
    via = SyntheticPairDataset.from_folder(tmp_path)
    assert type(via) is PairFolderDataset and via.cases == ds.cases
    with pytest.raises(IndexError, match="out of range for a dataset of 2"):
        ds[2]
    with pytest.raises(TypeError, match="transform must be callable"):
        PairFolderDataset(tmp_path, transform=3)

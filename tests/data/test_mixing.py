"""MixedBatchSampler and mix_loaders: exact counts, schedules, DDP shards, determinism, merging, errors."""

from __future__ import annotations

import math

import pytest
import torch
from monai.data import MetaTensor, list_data_collate
from torch.utils.data import ConcatDataset, DataLoader, Dataset, TensorDataset

from duodiff import MixedBatchSampler, mix_loaders
from duodiff.data import FractionSchedule, round_half_up


def concat(num_real: int, num_synthetic: int) -> ConcatDataset:
    return ConcatDataset([list(range(num_real)), list(range(1000, 1000 + num_synthetic))])


def n_synthetic(batch, num_real):
    return sum(i >= num_real for i in batch)


# ============================================================================================ schedules
def test_round_half_up():
    assert [round_half_up(x) for x in (0.0, 0.49, 0.5, 1.5, 2.5, 0.3 * 10, 0.35 * 10)] == [0, 0, 1, 2, 3, 3, 4]


def test_schedule_values():
    const = FractionSchedule("constant", synthetic_fraction=0.3)
    assert const(0.0) == const(1.0) == 0.3
    lin = FractionSchedule("linear", synthetic_fraction=0.5, final_synthetic_fraction=0.1)
    assert [round(lin(p), 6) for p in (0, 0.25, 0.5, 1, 2)] == [0.5, 0.4, 0.3, 0.1, 0.1]
    cos = FractionSchedule("cosine", synthetic_fraction=0.5, final_synthetic_fraction=0.1)
    assert cos(0) == pytest.approx(0.5) and cos(0.5) == pytest.approx(0.3) and cos(1) == pytest.approx(0.1)
    assert cos(0.25) == pytest.approx(0.1 + 0.4 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert FractionSchedule(lambda p: 0.2 * p)(0.5) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (("constant",), {}, "needs synthetic_fraction"),
        (("constant",), dict(synthetic_fraction=1.5), r"synthetic_fraction must be a number in \[0, 1\]"),
        (("linear",), dict(synthetic_fraction=0.5), "needs final_synthetic_fraction"),
        (("constant",), dict(synthetic_fraction=0.5, final_synthetic_fraction=0.1), "only applies to"),
        (("step",), dict(synthetic_fraction=0.5), "schedule must be one of"),
        ((lambda p: p,), dict(synthetic_fraction=0.5), "callable schedule"),
    ],
)
def test_schedule_validation(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        FractionSchedule(*args, **kwargs)


def test_callable_schedule_output_is_checked():
    with pytest.raises(ValueError, match=r"schedule\(0.5\) returned 2"):
        FractionSchedule(lambda p: 2)(0.5)


# ============================================================================================ sampler
def test_exact_counts_per_batch():
    sampler = MixedBatchSampler(concat(12, 50), batch_size=4, synthetic_fraction=0.25, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 4
    assert all(len(b) == 4 and n_synthetic(b, 12) == 1 for b in batches)
    reals = sorted(i for b in batches for i in b if i < 12)
    assert reals == list(range(12))  # one pass over the real data
    syn = [i for b in batches for i in b if i >= 12]
    assert len(set(syn)) == len(syn) and all(12 <= i < 62 for i in syn)
    assert all(b[:3] == [i for i in b if i < 12] for b in batches)  # reals first


@pytest.mark.parametrize(("fraction", "batch", "expected"), [(0.3, 10, 3), (0.35, 10, 4), (0.1, 4, 0), (0.125, 4, 1)])
def test_rounding_rule(fraction, batch, expected):
    sampler = MixedBatchSampler(concat(40, 40), batch_size=batch, synthetic_fraction=fraction)
    assert {n for _, n in sampler.batch_plan()} == {expected}


def test_min_real_per_batch_caps_synthetic():
    sampler = MixedBatchSampler(concat(6, 50), batch_size=4, synthetic_fraction=1.0, min_real_per_batch=1)
    assert sampler.batch_plan() == [(1, 3)] * 6
    with pytest.raises(ValueError, match="leaves no real sample.*min_real_per_batch >= 1"):
        MixedBatchSampler(concat(6, 50), batch_size=4, synthetic_fraction=1.0)


def test_last_partial_batch_and_drop_last():
    keep = MixedBatchSampler(concat(10, 50), batch_size=4, synthetic_fraction=0.25)
    assert keep.batch_plan() == [(3, 1), (3, 1), (3, 1), (1, 1)]
    drop = MixedBatchSampler(concat(10, 50), batch_size=4, synthetic_fraction=0.25, drop_last=True)
    assert drop.batch_plan() == [(3, 1)] * 3 and all(len(b) == 4 for b in drop)


def test_schedule_over_epochs():
    sampler = MixedBatchSampler(concat(8, 100), batch_size=4, synthetic_fraction=0.5, schedule="linear",
                                final_synthetic_fraction=0.0, num_epochs=3)
    counts = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        counts.append({n_synthetic(b, 8) for b in sampler})
    assert counts == [{2}, {1}, {0}]  # 0.5, 0.25, 0.0 of 4
    cosine = MixedBatchSampler(concat(8, 100), batch_size=4, synthetic_fraction=0.5, schedule="cosine",
                               final_synthetic_fraction=0.0, num_epochs=5)
    assert [cosine.batch_plan(e)[0][1] for e in range(5)] == [2, 2, 1, 0, 0]  # 0.5 0.43 0.25 0.07 0


def test_schedule_over_steps():
    sampler = MixedBatchSampler(concat(30, 100), batch_size=4, synthetic_fraction=0.75, schedule="linear",
                                final_synthetic_fraction=0.0, num_epochs=1, schedule_unit="step")
    counts = [n for _, n in sampler.batch_plan()]
    assert counts[0] == 3 and counts[-1] == 0
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    assert sum(r for r, _ in sampler.batch_plan()) == 30


def test_callable_schedule():
    sampler = MixedBatchSampler(concat(8, 100), batch_size=4, schedule=lambda p: 0.5 if p < 0.5 else 0.25,
                                num_epochs=2)
    assert [sampler.batch_plan(e)[0][1] for e in range(2)] == [2, 1]


def test_changing_schedule_needs_num_epochs():
    with pytest.raises(ValueError, match="needs num_epochs"):
        MixedBatchSampler(concat(8, 8), batch_size=4, synthetic_fraction=0.5, schedule="linear",
                          final_synthetic_fraction=0.1)


@pytest.mark.parametrize(
    ("dataset", "kwargs", "err", "match"),
    [
        (list(range(10)), {}, TypeError, r"ConcatDataset\(\[real, synthetic\]\)"),
        (ConcatDataset([[1], [2], [3]]), {}, TypeError, "ConcatDataset of 3 datasets"),
        (concat(8, 8), dict(batch_size=0), ValueError, "batch_size must be an int >= 1"),
        (concat(8, 8), dict(min_real_per_batch=5), ValueError, "cannot exceed batch_size"),
        (concat(8, 8), dict(rank=1), ValueError, "rank and num_replicas together"),
        (concat(8, 8), dict(rank=2, num_replicas=2), ValueError, r"rank must be an int in \[0, 2\)"),
        (concat(8, 8), dict(schedule_unit="batch", schedule="linear", final_synthetic_fraction=0, num_epochs=2),
         ValueError, "schedule_unit must be one of"),
    ],
)
def test_sampler_validation(dataset, kwargs, err, match):
    kw = dict(batch_size=4, synthetic_fraction=0.25) | kwargs
    with pytest.raises(err, match=match):
        MixedBatchSampler(dataset, **kw)


def test_ddp_shards_are_disjoint_and_complete():
    data = concat(20, 200)
    samplers = [MixedBatchSampler(data, batch_size=4, synthetic_fraction=0.25, seed=3, rank=r, num_replicas=2)
                for r in range(2)]
    for epoch in range(2):
        per_rank = []
        for s in samplers:
            s.set_epoch(epoch)
            per_rank.append([i for b in s for i in b])
        assert len(samplers[0]) == len(samplers[1])
        real = [{i for i in idx if i < 20} for idx in per_rank]
        syn = [{i for i in idx if i >= 20} for idx in per_rank]
        assert real[0].isdisjoint(real[1]) and real[0] | real[1] == set(range(20))
        assert syn[0].isdisjoint(syn[1])


def test_ddp_padding_and_drop_last():
    data = concat(21, 200)
    padded = [MixedBatchSampler(data, batch_size=4, synthetic_fraction=0.25, rank=r, num_replicas=2)
              for r in range(2)]
    reals = [[i for b in s for i in b if i < 21] for s in padded]
    assert len(reals[0]) == len(reals[1]) == 11 and set(reals[0]) | set(reals[1]) == set(range(21))
    dropped = [MixedBatchSampler(data, batch_size=4, synthetic_fraction=0.25, rank=r, num_replicas=2,
                                 drop_last=True) for r in range(2)]
    reals = [{i for b in s for i in b if i < 21} for s in dropped]
    assert reals[0].isdisjoint(reals[1]) and len(reals[0]) == len(reals[1]) == 9  # 10 per rank -> 3 full batches


def test_sampler_determinism_and_epochs():
    def run(seed, epoch):
        s = MixedBatchSampler(concat(12, 100), batch_size=4, synthetic_fraction=0.25, seed=seed)
        s.set_epoch(epoch)
        return list(s)

    assert run(0, 0) == run(0, 0)
    assert run(0, 0) != run(1, 0)
    assert run(0, 0) != run(0, 1)
    syn = [i for e in range(3) for b in run(0, e) for i in b if i >= 12]
    assert len(set(syn)) == len(syn)  # the synthetic stream continues across epochs without repeats


def test_synthetic_stream_cycles_through_permutations():
    s = MixedBatchSampler(concat(12, 3), batch_size=4, synthetic_fraction=0.5)  # needs 12 synthetic, has 3
    syn = [i - 12 for b in s for i in b if i >= 12]
    assert len(syn) == 12
    for k in range(4):
        assert sorted(syn[3 * k : 3 * k + 3]) == [0, 1, 2]


def test_sampler_drives_a_dataloader():
    real = TensorDataset(torch.zeros(6, 2), torch.zeros(6, dtype=torch.bool))
    syn = TensorDataset(torch.ones(10, 2), torch.ones(10, dtype=torch.bool))
    data = ConcatDataset([real, syn])
    loader = DataLoader(data, batch_sampler=MixedBatchSampler(data, batch_size=3, synthetic_fraction=1 / 3))
    batches = list(loader)
    assert len(batches) == 3 and all(int(flag.sum()) == 1 for _, flag in batches)


# ============================================================================================ mix_loaders
class Dicts(Dataset):
    """Dict items with an id so tests can follow each sample."""

    def __init__(self, n, start=0, *, shape=(1, 4, 4), dtype=torch.float32, extra=None):
        self.n, self.start, self.shape, self.dtype, self.extra = n, start, shape, dtype, extra or {}

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"image": torch.full(self.shape, float(self.start + i)).to(self.dtype),
                "label": torch.full(self.shape, self.start + i, dtype=torch.long), **self.extra}


def ids(batch):
    return batch["image"].flatten(1)[:, 0].long().tolist()


def test_dict_batches_get_exact_counts_and_flags():
    real = DataLoader(Dicts(9), batch_size=3)
    syn = DataLoader(Dicts(100, start=1000), batch_size=2)
    mixed = mix_loaders(real, syn, synthetic_fraction=0.25)
    batches = list(mixed)
    assert len(batches) == len(mixed) == len(real) == 3
    for b in batches:
        assert b["image"].shape == (4, 1, 4, 4) and b["is_synthetic"].tolist() == [False, False, False, True]
    assert [ids(b)[:3] for b in batches] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert [ids(b)[3] for b in batches] == [1000, 1001, 1002]  # leftover rows of synthetic batches are used
    assert [ids(b)[3] for b in mixed] == [1003, 1004, 1005]  # the synthetic side is not restarted per epoch


def test_synthetic_dataset_is_drawn_in_seeded_order():
    real = DataLoader(Dicts(6), batch_size=3)

    def draw(seed):
        return [ids(b)[3:] for b in mix_loaders(real, Dicts(5, 1000), synthetic_fraction=0.25, seed=seed)]

    assert draw(0) == draw(0) and draw(0) != draw(1)
    assert all(1000 <= i < 1005 for d in draw(0) for i in d)


def test_tuple_batches_with_keys():
    real = DataLoader(TensorDataset(torch.zeros(6, 1, 4, 4), torch.zeros(6, 1, 4, 4, dtype=torch.long)),
                      batch_size=3)
    mixed = mix_loaders(real, Dicts(10, 1), synthetic_fraction=0.25, keys=("image", "label"))
    x, y, flag = next(iter(mixed))
    assert x.shape == (4, 1, 4, 4) and y.dtype == torch.long and flag.tolist() == [False] * 3 + [True]
    with pytest.raises(ValueError, match=r"pass keys=\('image', 'label'\)"):
        next(iter(mix_loaders(real, Dicts(10, 1), synthetic_fraction=0.25)))


def test_tensor_batches_become_tensor_and_flag():
    real = DataLoader(torch.zeros(6, 1, 4, 4), batch_size=3)
    x, flag = next(iter(mix_loaders(real, Dicts(10, 1), synthetic_fraction=0.25, keys=("image",))))
    assert x.shape == (4, 1, 4, 4) and flag.tolist() == [False] * 3 + [True]


def test_flag_key_none_keeps_structure():
    real = DataLoader(Dicts(3), batch_size=3)
    batch = next(iter(mix_loaders(real, Dicts(5, 100), synthetic_fraction=0.25, flag_key=None)))
    assert set(batch) == {"image", "label"} and batch["image"].shape[0] == 4


def test_existing_flags_and_seed_key():
    real = DataLoader(Dicts(3, extra={"is_synthetic": False}), batch_size=3)
    syn = Dicts(5, 100, extra={"is_synthetic": True, "seed": 7})
    batch = next(iter(mix_loaders(real, syn, synthetic_fraction=0.25)))
    assert set(batch) == {"image", "label", "is_synthetic"}  # "seed" dropped: the real data has none
    assert batch["is_synthetic"].tolist() == [False, False, False, True]


@pytest.mark.parametrize(
    ("synthetic", "err", "match"),
    [
        (Dicts(5, extra={"mask": 1}), ValueError, r"only in synthetic \['mask'\]"),
        (Dicts(5, shape=(1, 4, 5)), ValueError, r"batch\['image'\].*\(1, 4, 4\).*\(1, 4, 5\)"),
        (Dicts(5, dtype=torch.float64), ValueError, r"batch\['image'\].*torch.float32.*torch.float64"),
    ],
)
def test_mismatches_name_the_key(synthetic, err, match):
    real = DataLoader(Dicts(3), batch_size=3)
    with pytest.raises(err, match=match):
        next(iter(mix_loaders(real, synthetic, synthetic_fraction=0.25)))


def test_missing_key_is_named():
    real = DataLoader(Dicts(3, extra={"weight": 1.0}), batch_size=3)
    with pytest.raises(ValueError, match=r"missing in synthetic \['weight'\]"):
        next(iter(mix_loaders(real, Dicts(5), synthetic_fraction=0.25)))


def test_step_schedule_in_mix_loaders():
    real = DataLoader(Dicts(15), batch_size=3)  # 5 steps
    mixed = mix_loaders(real, Dicts(100, 1000), synthetic_fraction=0.5, schedule="linear",
                        final_synthetic_fraction=0.0, num_epochs=1, schedule_unit="step")
    counts = [int(b["is_synthetic"].sum()) for b in mixed]
    assert counts == [3, 2, 1, 0, 0]  # f = 0.5, 0.375, 0.25, 0.125, 0 -> round_half_up(f * 3 / (1 - f))
    with pytest.raises(ValueError, match="fraction < 1"):
        next(iter(mix_loaders(real, Dicts(5), synthetic_fraction=1.0)))


def test_set_epoch_is_forwarded_and_drives_epoch_schedule():
    class Tracking(Dicts):
        epochs: list = []

        def set_epoch(self, e):
            self.epochs.append(e)

    syn = Tracking(100, 1000)
    mixed = mix_loaders(DataLoader(Dicts(3), batch_size=3), syn, synthetic_fraction=0.5, schedule="linear",
                        final_synthetic_fraction=0.0, num_epochs=3, schedule_unit="epoch")
    assert [int(next(iter(mixed))["is_synthetic"].sum()) for _ in range(1)] == [3]
    mixed.set_epoch(2)
    assert syn.epochs == [2] and int(next(iter(mixed))["is_synthetic"].sum()) == 0


def test_batched_metatensors_keep_per_sample_affines():
    def item(value, scale):
        return {"image": MetaTensor(torch.full((1, 2, 2), float(value)), affine=torch.eye(4) * scale)}

    class Items(Dataset):
        def __init__(self, scale):
            self.scale = scale

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return item(i, self.scale)

    real = DataLoader(Items(2.0), batch_size=3, collate_fn=list_data_collate)
    syn = DataLoader(Items(5.0), batch_size=2, collate_fn=list_data_collate)
    batch = next(iter(mix_loaders(real, syn, synthetic_fraction=0.25)))
    image = batch["image"]
    assert isinstance(image, MetaTensor) and image.is_batch
    assert image.affine.shape == (4, 4, 4) and image.affine[:, 0, 0].tolist() == [2.0, 2.0, 2.0, 5.0]


def test_metatensor_real_with_plain_synthetic_is_an_error():
    class Meta(Dicts):
        def __getitem__(self, i):
            d = super().__getitem__(i)
            return {k: MetaTensor(v) for k, v in d.items()}

    real = DataLoader(Meta(3), batch_size=3, collate_fn=list_data_collate)
    with pytest.raises(TypeError, match="MetaTensor but the synthetic one a plain tensor"):
        next(iter(mix_loaders(real, Dicts(5), synthetic_fraction=0.25)))


def test_mix_loaders_argument_errors():
    real = DataLoader(Dicts(3), batch_size=3)
    with pytest.raises(TypeError, match="synthetic must be a torch DataLoader or Dataset"):
        mix_loaders(real, [1, 2, 3], synthetic_fraction=0.25)
    with pytest.raises(ValueError, match="needs num_epochs"):
        mix_loaders(real, Dicts(3), synthetic_fraction=0.5, schedule="cosine", final_synthetic_fraction=0.1)
    with pytest.raises(TypeError, match="keys must be a non-empty sequence"):
        mix_loaders(real, Dicts(3), synthetic_fraction=0.5, keys="image")


# ============================================================================================ per-sample metadata
#: A real scan's geometry (MONAI LoadImaged gives LAS, 1.25 x 1.25 x 7.7 mm) unlike the model's affine.
REAL_AFFINE = torch.diag(torch.tensor([-1.25, 1.25, 7.7, 1.0], dtype=torch.float64))


class RealScans(Dataset):
    """Stand-in for a MONAI real dataset: marked MetaTensor pairs with their own (anisotropic LAS) affine."""

    def __init__(self, n=4, shape=(16, 16, 16)):
        self.n, self.shape = n, shape

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        from duodiff.data import mark_real

        aff = REAL_AFFINE.clone()
        aff[0, 3] = float(i)  # each scan its own origin
        return mark_real({"image": MetaTensor(torch.full((1, *self.shape), i / 10), affine=aff),
                          "label": MetaTensor(torch.zeros((1, *self.shape), dtype=torch.int64), affine=aff.clone())})


def _expected_affine(is_synthetic: bool, index: int, synthetic_affine: torch.Tensor) -> torch.Tensor:
    if is_synthetic:
        return synthetic_affine
    aff = REAL_AFFINE.clone()
    aff[0, 3] = float(index)
    return aff


def _check_one_affine_per_sample(batch, synthetic_affine) -> tuple[int, int]:
    """Every sample of the batch keeps its own affine, also after ``decollate_batch``; returns (real, synthetic)."""
    from monai.data import decollate_batch

    n = len(batch["is_synthetic"])
    for key in ("image", "label"):
        assert isinstance(batch[key], MetaTensor) and batch[key].is_batch, key
        assert tuple(batch[key].affine.shape) == (n, 4, 4), key
    counts = [0, 0]
    for item in decollate_batch(batch):
        syn = bool(item["is_synthetic"])
        counts[syn] += 1
        index = -1 if syn else round(float(item["image"].as_tensor().flatten()[0]) * 10)
        want = _expected_affine(syn, index, synthetic_affine)
        for key in ("image", "label"):
            assert torch.allclose(item[key].affine.to(torch.float64), want), (key, syn, item[key].affine)
    return counts[0], counts[1]


@pytest.fixture(scope="module")
def synthetic_pairs(tiny_pipe):
    from duodiff import SyntheticPairDataset

    ds = SyntheticPairDataset(tiny_pipe, num_samples=4, num_inference_steps=2)
    affine = ds[0]["image"].affine.to(torch.float64)
    assert not torch.allclose(affine, REAL_AFFINE)  # the test needs two geometries
    return ds, affine


@pytest.mark.parametrize("loader_kind", ["torch", "monai", "torch-spawn"])
def test_mixed_batch_sampler_keeps_one_affine_per_sample(synthetic_pairs, loader_kind):
    """case05: ConcatDataset + MixedBatchSampler with a plain torch DataLoader (default collate), a MONAI
    DataLoader, and spawned workers (a fresh process that only imported duodiff by unpickling the dataset)."""
    import monai.data

    syn, syn_affine = synthetic_pairs
    data = ConcatDataset([RealScans(4), syn])
    sampler = MixedBatchSampler(data, batch_size=2, synthetic_fraction=0.5, seed=0)
    if loader_kind == "monai":
        loader = monai.data.DataLoader(data, batch_sampler=sampler, num_workers=2, timeout=300)
    elif loader_kind == "torch":
        loader = DataLoader(data, batch_sampler=sampler, num_workers=2, timeout=300)
    else:
        loader = DataLoader(data, batch_sampler=sampler, num_workers=1, timeout=300, multiprocessing_context="spawn")
    totals = [_check_one_affine_per_sample(batch, syn_affine) for batch in loader]
    assert totals == [(1, 1)] * 4


def test_plain_torch_dataloader_keeps_affines_in_a_fresh_process(tmp_path):
    """case05 exactly, in a new interpreter where MONAI's list_data_collate never ran: importing duodiff is enough."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import torch
        from torch.utils.data import ConcatDataset, DataLoader
        from torch.utils.data._utils.collate import default_collate_fn_map
        from monai.data import MetaTensor, decollate_batch
        assert MetaTensor not in default_collate_fn_map
        from duodiff import MixedBatchSampler, SyntheticPairDataset
        from duodiff.testing import tiny_pipeline
        aff = torch.diag(torch.tensor([-1.25, 1.25, 7.7, 1.0], dtype=torch.float64))
        real = [{"image": MetaTensor(torch.rand(1, 16, 16, 16), affine=aff), "is_synthetic": False, "seed": -1}]
        syn = SyntheticPairDataset(tiny_pipeline(), num_samples=2, num_inference_steps=2,
                                   transform=lambda d: {k: d[k] for k in ("image", "is_synthetic", "seed")})
        data = ConcatDataset([real, syn])
        sampler = MixedBatchSampler(data, batch_size=2, synthetic_fraction=0.5)
        batch = next(iter(DataLoader(data, batch_sampler=sampler)))
        print(tuple(batch["image"].affine.shape), [round(float(i["image"].affine[2, 2]), 3)
                                                   for i in decollate_batch(batch)])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "(2, 4, 4) [7.7, 1.0]"


@pytest.mark.parametrize(("source", "real_kind"), [("map", "torch"), ("stream", "torch"), ("loader", "torch"),
                                                    ("stream", "monai")])
def test_mix_loaders_keeps_one_affine_per_sample(synthetic_pairs, tiny_pipe, source, real_kind):
    """mix_loaders around a torch DataLoader (workers, default collate) or a MONAI one (the example's way) with a
    map-style dataset, a stream or a synthetic DataLoader: samples of different geometry each keep their affine."""
    import monai.data

    from duodiff import SyntheticPairDataset

    syn, syn_affine = synthetic_pairs
    if source == "stream":
        syn = SyntheticPairDataset(tiny_pipe, num_samples=None, num_inference_steps=2, generation_batch_size=1,
                                   pool_size=1)
    elif source == "loader":
        syn = DataLoader(syn, batch_size=2, num_workers=1, timeout=300)
    loader_cls = monai.data.DataLoader if real_kind == "monai" else DataLoader
    real = loader_cls(RealScans(4), batch_size=3, num_workers=2, timeout=300)
    with mix_loaders(real, syn, synthetic_fraction=0.25) as mixed:
        totals = [_check_one_affine_per_sample(batch, syn_affine) for batch in mixed]
    assert totals == [(3, 1), (1, 0)]


def test_mix_loaders_splits_a_batch_stacked_without_monai_collate():
    """A batch stacked with torch.stack (one MetaTensor, one affine, not a MONAI batch) gives that affine to each
    of its samples; the merged batch still has one affine per sample."""
    def stacked(scale):
        def collate(items):
            return {"image": torch.stack([MetaTensor(torch.full((1, 2, 2), float(i)), affine=torch.eye(4) * scale)
                                          for i in items])}
        return collate

    real = DataLoader(list(range(3)), batch_size=3, collate_fn=stacked(2.0))
    syn = DataLoader(list(range(4)), batch_size=2, collate_fn=stacked(5.0))
    image = next(iter(mix_loaders(real, syn, synthetic_fraction=0.25)))["image"]
    assert image.is_batch and image.affine.shape == (4, 4, 4)
    assert image.affine[:, 0, 0].tolist() == [2.0, 2.0, 2.0, 5.0]

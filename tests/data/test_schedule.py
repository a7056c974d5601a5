"""The one definition of schedule progress and synthetic count, shared by MixedBatchSampler and mix_loaders."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from duodiff import MixedBatchSampler, mix_loaders
from duodiff.data.schedule import (
    DEFAULT_SCHEDULE_UNIT,
    FractionSchedule,
    schedule_progress,
    synthetic_count,
    synthetic_count_for_real,
)

FRACTIONS = [i / 40 for i in range(40)] + [1 / 3, 2 / 3, 0.05, 0.95, 0.999]


class Ids(Dataset):
    def __init__(self, n, start=0):
        self.n, self.start = n, start

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"x": torch.tensor([float(self.start + i)])}


def concat(num_real, num_synthetic):
    return ConcatDataset([list(range(num_real)), list(range(1000, 1000 + num_synthetic))])


def test_both_mixers_default_to_the_same_unit():
    defaults = {fn.__name__: inspect.signature(fn).parameters["schedule_unit"].default
                for fn in (MixedBatchSampler.__init__, mix_loaders)}
    assert defaults == {"__init__": "epoch", "mix_loaders": "epoch"} and DEFAULT_SCHEDULE_UNIT == "epoch"


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_count_for_real_batches_obeys_the_batch_rule(fraction):
    for num_real in range(1, 33):
        n = synthetic_count_for_real(fraction, num_real)
        assert n >= 0 and synthetic_count(fraction, num_real + n) == n, (fraction, num_real, n)


@pytest.mark.parametrize("fraction", FRACTIONS[::3])
def test_a_mix_loaders_batch_and_a_sampler_batch_of_its_size_split_the_same_way(fraction):
    """mix_loaders appends n to r real samples; MixedBatchSampler(batch_size=r + n) makes batches of r real + n."""
    for num_real in (1, 2, 3, 5, 8):
        n = synthetic_count_for_real(fraction, num_real)
        sampler = MixedBatchSampler(concat(4 * num_real, 50), batch_size=num_real + n, synthetic_fraction=fraction,
                                    min_real_per_batch=1)
        assert set(sampler.batch_plan()) == {(num_real, n)}
        mixed = mix_loaders(DataLoader(Ids(4 * num_real), batch_size=num_real), Ids(50, 1000),
                            synthetic_fraction=fraction)
        assert {int(b["is_synthetic"].sum()) for b in mixed} == {n}


def test_epoch_schedule_gives_both_mixers_the_same_fraction_per_epoch():
    kwargs = dict(synthetic_fraction=0.5, schedule="cosine", final_synthetic_fraction=0.0, num_epochs=5)
    fractions = FractionSchedule("cosine", synthetic_fraction=0.5, final_synthetic_fraction=0.0)
    sampler = MixedBatchSampler(concat(12, 100), batch_size=6, **kwargs)
    mixed = mix_loaders(DataLoader(Ids(12), batch_size=3), Ids(100, 1000), **kwargs)
    for epoch in range(5):
        sampler.set_epoch(epoch)
        mixed.set_epoch(epoch)
        p = schedule_progress(epoch, num_epochs=5, unit="epoch")
        assert sampler.progress(epoch) == mixed.progress(0) == mixed.progress(3) == p == epoch / 4
        f = fractions(p)
        assert all(n == synthetic_count(f, 6) for _, n in sampler.batch_plan(epoch))
        for batch in mixed:  # every merged batch holds the rule's count for its own size
            assert int(batch["is_synthetic"].sum()) == synthetic_count(f, len(batch["is_synthetic"]))


def test_step_progress_is_the_shared_formula_in_both_mixers():
    kwargs = dict(synthetic_fraction=0.6, schedule="linear", final_synthetic_fraction=0.0, num_epochs=2,
                  schedule_unit="step")
    sampler = MixedBatchSampler(concat(10, 100), batch_size=4, **kwargs)
    mixed = mix_loaders(DataLoader(Ids(10), batch_size=2), Ids(100, 1000), **kwargs)
    mixed.set_epoch(1)
    for done in range(10):
        assert sampler.progress(1, done) == schedule_progress(1, num_epochs=2, unit="step", done=done, per_epoch=10)
    for step in range(5):
        assert mixed.progress(step) == schedule_progress(1, num_epochs=2, unit="step", done=step, per_epoch=5)
    assert schedule_progress(1, num_epochs=2, unit="step", done=4, per_epoch=5) == 1.0  # the last batch ends it
    assert schedule_progress(3, num_epochs=None, unit="step") == 0.0


def test_rule_values_and_errors():
    assert [synthetic_count(f, b) for f, b in ((0.25, 4), (0.3, 10), (0.35, 10), (0.1, 4), (0.125, 4))] == [
        1, 3, 4, 0, 1]
    assert [synthetic_count_for_real(f, 3) for f in (0.0, 0.25, 0.5, 0.75)] == [0, 1, 3, 9]
    with pytest.raises(ValueError, match="fraction < 1"):
        synthetic_count_for_real(1.0, 3)

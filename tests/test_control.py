"""Attribute-conditioned label generation, rejection sampling and pair-consistency QC."""

from __future__ import annotations

import math

import pytest
import torch

from duodiff import DuoDiffusion
from duodiff.attributes import (
    attribute_names,
    class_volumes_ml,
    compute_attributes,
    make_context,
    requested_attributes,
)
from duodiff.control import pair_dice, volumes_within_tolerance
from duodiff.testing import randomize_weights, tiny_pipeline

NAMES = ("background", "a", "b")


@pytest.fixture(scope="module")
def conditioned() -> DuoDiffusion:
    pipe = randomize_weights(DuoDiffusion.from_preset("tiny", num_classes=3, label_names=NAMES, attributes=["volume"]))
    pipe.config = pipe.config.replace(attribute_mean=(5.0, 5.0), attribute_std=(1.0, 1.0))
    return pipe


class OneHotOf(torch.nn.Module):
    """A 'segmenter' that returns a fixed label map as one-hot logits (an oracle or a liar)."""

    def __init__(self, labels: torch.Tensor, k: int = 3) -> None:
        super().__init__()
        self.register_buffer("oh", torch.nn.functional.one_hot(labels[:, 0], k).movedim(-1, 1).float())
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.oh[: x.shape[0]]


def test_compute_attributes_known_volumes_and_centroids():
    lab = torch.zeros(2, 1, 8, 8, 8, dtype=torch.long)
    lab[0, 0, :2, :2, :2] = 1  # 8 voxels of class 1 in the corner
    lab[1, 0, 4:, 4:, 4:] = 2  # 64 voxels of class 2
    vol = compute_attributes(lab, 3, ["volume"])
    assert torch.allclose(vol, torch.log1p(torch.tensor([[8.0, 0.0], [0.0, 64.0]])))
    cen = compute_attributes(lab, 3, ["centroid"])
    assert cen.shape == (2, 6)
    assert torch.allclose(cen[0, :3], torch.full((3,), 0.5 / 7), atol=1e-6)  # mean of coords 0 and 1/7
    assert torch.allclose(cen[0, 3:], torch.full((3,), 0.5))  # absent class -> 0.5
    ml = class_volumes_ml(lab, NAMES, (2.0, 1.0, 1.0))
    assert ml["a"].tolist() == [8 * 2 / 1000, 0.0]


def test_attribute_columns_and_context_layout():
    assert attribute_names(["volume", "centroid"], NAMES)[:3] == ["volume:a", "volume:b", "centroid_x:a"]
    ctx = make_context(torch.tensor([[1.5, -2.0]]), torch.tensor([[1.0, 0.0]]), 8)
    assert ctx.shape == (1, 1, 8)
    assert ctx[0, 0].tolist() == [1.5, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_requested_attributes_units_and_errors():
    values, mask = requested_attributes({"a": 1.5, 2: 0.25}, 2, attributes=["volume"], label_names=NAMES,
                                        spacing=(1.0, 1.0, 1.0))
    assert mask.tolist() == [[1.0, 1.0], [1.0, 1.0]]
    assert math.isclose(float(values[0, 0]), math.log1p(1500.0), rel_tol=1e-6)  # 1.5 mL = 1500 voxels of 1 mm^3
    with pytest.raises(ValueError, match="Unknown class 'c'"):
        requested_attributes({"c": 1.0}, 1, attributes=["volume"], label_names=NAMES, spacing=(1, 1, 1))
    with pytest.raises(ValueError, match="positive volume in mL"):
        requested_attributes({"a": -1.0}, 1, attributes=["volume"], label_names=NAMES, spacing=(1, 1, 1))
    with pytest.raises(ValueError, match="not a foreground class"):
        requested_attributes({0: 1.0}, 1, attributes=["volume"], label_names=NAMES, spacing=(1, 1, 1))
    with pytest.raises(ValueError, match="one mapping per sample"):
        requested_attributes([{"a": 1.0}], 2, attributes=["volume"], label_names=NAMES, spacing=(1, 1, 1))


def test_unconditioned_model_rejects_class_volumes():
    pipe = tiny_pipeline(label_names=NAMES)
    with pytest.raises(ValueError, match="not trained with volume conditioning"):
        pipe.sample(1, seed=0, num_inference_steps=2, progress=False, class_volumes={"a": 1.0})


def test_conditioning_changes_labels_and_guidance_is_deterministic(conditioned):
    kw = dict(seed=3, num_inference_steps=2, progress=False)
    plain = conditioned.sample(2, **kw)
    asked = conditioned.sample(2, class_volumes={"a": 3.0}, guidance_scale=3.0, **kw)
    again = conditioned.sample(2, class_volumes={"a": 3.0}, guidance_scale=3.0, **kw)
    assert torch.equal(asked.labels, again.labels) and torch.equal(asked.images, again.images)
    assert not torch.equal(plain.labels, asked.labels)
    assert plain.report == {}  # no constraints -> no report


def test_volume_rejection_retries_and_keeps_failures(conditioned):
    out = conditioned.sample(3, seed=0, num_inference_steps=2, progress=False, class_volumes={"a": 0.5},
                             volume_tolerance=1e-4, max_retries=2)
    r = out.report
    assert len(out) == 3 and out.labels.shape[0] == 3  # nothing dropped
    assert r["attempts"] > 3 and r["volume_rejections"] >= 3
    assert set(r["failed_seeds"]) <= set(out.seeds)
    assert out.seeds != [0, 1, 2]  # rejected samples were regenerated with retry seeds ...
    again = conditioned.sample(1, seed=out.seeds[0], num_inference_steps=2, progress=False, class_volumes={"a": 0.5})
    assert torch.equal(again.labels[0], out.labels[0])  # ... that reproduce them
    assert 0.0 <= r["acceptance_rate"] <= 1.0


def test_volume_and_qc_failures_are_listed_once(conditioned):
    """A sample that misses its volume and then fails QC (or is regenerated by QC and misses its volume again) is
    one failed sample: its seed is listed once and the acceptance rate stays in [0, 1]."""
    first = conditioned.sample(3, seed=0, num_inference_steps=2, progress=False)
    liar = OneHotOf(torch.zeros_like(first.labels))  # Dice 0 for every pair: QC rejects all
    out = conditioned.sample(3, seed=0, num_inference_steps=2, progress=False, class_volumes={"a": 0.5},
                             volume_tolerance=1e-4, qc=liar, qc_threshold=0.5, max_retries=1)
    r = out.report
    assert len(out) == 3
    assert sorted(r["failed_seeds"]) == sorted(out.seeds)  # every kept sample failed, each listed once
    assert r["acceptance_rate"] == 0.0


def test_volumes_within_tolerance_math():
    lab = torch.zeros(1, 1, 10, 10, 10, dtype=torch.long)
    lab[0, 0, :10, :10, :1] = 1  # 100 voxels
    want = torch.log1p(torch.tensor([[110.0, 5.0]]))
    assert volumes_within_tolerance(lab, want, torch.tensor([[1.0, 0.0]]), 0.1, 3).item()
    assert not volumes_within_tolerance(lab, want, torch.tensor([[1.0, 0.0]]), 0.05, 3).item()
    assert not volumes_within_tolerance(lab, want, torch.tensor([[1.0, 1.0]]), 0.1, 3).item()


def test_qc_oracle_passes_liar_is_retried():
    pipe = tiny_pipeline(label_names=NAMES)
    first = pipe.sample(2, seed=0, num_inference_steps=2, progress=False)
    oracle = OneHotOf(first.labels)
    assert pair_dice(oracle, first.images, first.labels, 3).tolist() == [1.0, 1.0]
    ok = pipe.sample(2, seed=0, num_inference_steps=2, progress=False, qc=oracle, qc_threshold=0.9)
    assert ok.report["qc_rejections"] == 0 and ok.report["attempts"] == 2 and ok.seeds == [0, 1]
    assert torch.equal(ok.labels, first.labels)
    liar = OneHotOf(torch.zeros_like(first.labels))  # predicts background everywhere: Dice 0
    bad = pipe.sample(2, seed=0, num_inference_steps=2, progress=False, qc=liar, qc_threshold=0.5, max_retries=2)
    assert bad.report["qc_rejections"] == 6 and bad.report["attempts"] == 6
    assert len(bad.report["failed_seeds"]) == 2 and len(bad) == 2
    with pytest.raises(ValueError, match="qc_threshold"):
        pipe.sample(1, seed=0, num_inference_steps=2, progress=False, qc=oracle, qc_threshold=1.5)


def test_conditioned_label_unet_trains_and_stores_stats(tmp_path):
    from duodiff.train import TrainConfig, train
    from tests.train.test_trainer import make_config, write_dataset

    data = write_dataset(tmp_path / "d", n=3)
    cfg = make_config(tmp_path, data, steps=2).to_dict()
    cfg["model"]["attributes"] = ["volume"]
    train(TrainConfig.from_dict(cfg), stages=["label_autoencoder", "label_unet"])
    pipe = DuoDiffusion.from_pretrained(tmp_path / "run" / "model")
    assert pipe.config.attributes == ("volume",) and len(pipe.config.attribute_mean) == 2
    out = pipe.sample(2, seed=0, num_inference_steps=2, progress=False, class_volumes={"outer": 1.0},
                      guidance_scale=2.0)
    assert out.labels.shape == (2, 1, 16, 16, 16)


def test_synthetic_dataset_applies_qc(tmp_path):
    from duodiff import SyntheticPairDataset

    pipe = tiny_pipeline(label_names=NAMES)
    first = pipe.sample(2, seed=0, num_inference_steps=2, progress=False)
    liar = OneHotOf(torch.zeros_like(first.labels))
    ds = SyntheticPairDataset(pipe, num_samples=2, num_inference_steps=2,
                              sample_kwargs={"qc": liar, "qc_threshold": 0.5, "max_retries": 1})
    item = ds[0]
    assert item["seed"] != 0  # regenerated with a retry seed
    plain = SyntheticPairDataset(pipe, num_samples=2, num_inference_steps=2)
    assert plain[0]["seed"] == 0
    with pytest.raises(ValueError, match="unknown option"):
        SyntheticPairDataset(pipe, num_samples=2, sample_kwargs={"qcc": liar})


def test_pair_dice_is_the_mean_foreground_dice_with_absent_classes_scoring_one():
    """pair_dice (QC) and duodiff.metrics.dice_per_class (evaluate) are one Dice: same values, same empty-class rule."""
    labels = torch.zeros(2, 1, 4, 4, 4, dtype=torch.long)
    labels[0, 0, :2] = 1  # sample 0: class 1 (32 voxels), class 2 absent
    labels[1, 0, :1] = 2  # sample 1: class 2 (16 voxels), class 1 absent
    pred = labels.clone()
    pred[0, 0, 0] = 0  # 16 of class 1's 32 voxels missed: Dice 2 * 16 / 48
    pred[1, 0, 3] = 1  # class 1 predicted but absent: Dice 0
    expected = torch.tensor([(2 * 16 / 48 + 1.0) / 2, (0.0 + 1.0) / 2])
    assert torch.allclose(pair_dice(OneHotOf(pred), torch.zeros(2, 1, 4, 4, 4), labels, 3), expected)

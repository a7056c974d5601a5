"""One set of sampling options (issue 15, item 2): every option is refused with the same error by each of
``sample``, ``sample_labels`` and ``generate_images`` where it applies, before any generation starts."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from duodiff import DuoDiffusion
from duodiff.control import RejectionSampler, retry_seed
from duodiff.sampling_options import SamplingOptions, SamplingPlan

N = 2
KW = dict(num_inference_steps=1, progress=False, dtype=None)


@pytest.fixture(scope="module")
def pipe() -> DuoDiffusion:
    return DuoDiffusion.from_preset("tiny", num_classes=3)


@pytest.fixture
def idle(pipe, monkeypatch) -> DuoDiffusion:
    """The pipeline with both stages replaced by failures: a test passes only if the error comes first."""
    def boom(*a, **k):  # pragma: no cover - must not be reached
        raise AssertionError("generation started before the options were checked")

    monkeypatch.setattr(pipe, "_generate_labels", boom)
    monkeypatch.setattr(pipe, "_generate_images", boom)
    return pipe


ENTRY_POINTS = {
    "sample": lambda p, **kw: p.sample(N, **{**KW, **kw}),
    "sample_labels": lambda p, **kw: p.sample_labels(N, **{**KW, **kw}),
    "generate_images": lambda p, **kw: p.generate_images(torch.zeros(N, 1, 16, 16, 16, dtype=torch.long),
                                                         **{**KW, **kw}),
}
ALL, LABELS, IMAGES, SAMPLE = tuple(ENTRY_POINTS), ("sample", "sample_labels"), ("sample", "generate_images"), (
    "sample",)

#: (case id, keyword arguments, exception, message fragment, entry points that take the option)
CASES = [
    ("seed-type", dict(seed="7"), TypeError, "seed must be an int or a list of ints, got '7'", ALL),
    ("seed-count", dict(seed=[1]), ValueError, r"Got 1 seeds for 2 samples; pass one seed per sample", ALL),
    ("seed-negative", dict(seed=-3), ValueError, r"seeds must be >= 0, got -3", ALL),
    ("seed-and-generator", dict(seed=0, generator=torch.Generator()), ValueError, "either seed or generator", ALL),
    ("batch_size", dict(batch_size=0), ValueError, "batch_size must be a positive int or None, got 0", ALL),
    ("num_inference_steps-type", dict(num_inference_steps=2.0), TypeError, "num_inference_steps must be an int",
     ALL),
    ("num_inference_steps-zero", dict(num_inference_steps=0), ValueError,
     r"between 1 and num_train_timesteps \(\d+\), got 0", ALL),
    ("num_inference_steps-too-many", dict(num_inference_steps=10**6), ValueError,
     r"got 1000000. Lower num_inference_steps", ALL),
    ("scheduler", dict(scheduler="euler"), ValueError,
        r"scheduler must be one of \[.*\] or None \(each stage's own\), got 'euler'", ALL),
    ("dtype", dict(dtype="int8"), ValueError, r"dtype must be one of .*got 'int8'", ALL),
    ("conditioning_scale", dict(conditioning_scale="1"), TypeError, "conditioning_scale must be a number, got '1'",
     IMAGES),
    ("decode_tile_size", dict(decode_tile_size="huge"), ValueError, "decode_tile_size must be None, 'auto'", IMAGES),
    ("class_volumes", dict(class_volumes={"a": 1.0}), ValueError, "not trained with volume conditioning", LABELS),
    ("guidance_scale-negative", dict(guidance_scale=-1.0), ValueError, "guidance_scale must be a number >= 0",
     LABELS),
    ("guidance_scale-type", dict(guidance_scale="2"), ValueError, "guidance_scale must be a number >= 0, got '2'",
     LABELS),
    ("volume_tolerance-without-request", dict(volume_tolerance=0.1), ValueError,
     "volume_tolerance needs class_volumes and a value > 0, got 0.1", SAMPLE),
    ("max_retries", dict(max_retries=-1), ValueError, "max_retries must be an int >= 0, got -1", SAMPLE),
    ("qc", dict(qc="segmenter"), TypeError, "qc must be a torch module", SAMPLE),
    ("qc_threshold", dict(qc=torch.nn.Identity(), qc_threshold=1.5), ValueError,
     r"qc_threshold must be a Dice value in \[0, 1\], got 1.5", SAMPLE),
    ("qc_threshold-nan", dict(qc=torch.nn.Identity(), qc_threshold=float("nan")), ValueError, "qc_threshold", SAMPLE),
    ("qc_threshold-type", dict(qc=torch.nn.Identity(), qc_threshold="0.5"), TypeError, "qc_threshold", SAMPLE),
]
PARAMS = [pytest.param(entry, kw, exc, match, id=f"{case}-{entry}")
          for case, kw, exc, match, entries in CASES for entry in entries]


@pytest.mark.parametrize("entry, kwargs, exc, match", PARAMS)
def test_each_option_is_refused_by_every_entry_point_before_generating(idle, entry, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ENTRY_POINTS[entry](idle, **kwargs)


@pytest.mark.parametrize("entry", LABELS)
@pytest.mark.parametrize("num_samples", [0, -1, 1.0, True])
def test_num_samples(idle, entry, num_samples):
    call = getattr(idle, entry)
    with pytest.raises(ValueError, match=f"num_samples must be a positive int, got {num_samples!r}"):
        call(num_samples, **KW)


def test_options_are_frozen_and_resolve_seeds_once():
    opts = SamplingOptions(3, seed=10)
    assert opts.seeds == (10, 11, 12) and opts.batch == 3 and not opts.stochastic and not opts.constrained
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.seed = 1  # type: ignore[misc]
    g = torch.Generator().manual_seed(0)
    drawn = SamplingOptions(2, generator=g).seeds
    assert drawn == tuple(torch.randint(0, 2**62, (2,), generator=torch.Generator().manual_seed(0)).tolist())
    assert SamplingOptions(2, seed=[4, 1], batch_size=1, scheduler="DDPM").seeds == (4, 1)
    assert SamplingOptions(1, scheduler="DDPM").stochastic


def test_a_refused_call_does_not_draw_from_the_generator():
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    with pytest.raises(ValueError, match="guidance_scale"):
        SamplingOptions(2, generator=g, guidance_scale=-1)
    assert torch.equal(g.get_state(), state)


def test_qc_threshold_is_only_checked_with_qc():
    """As before: without ``qc`` the threshold is unused (and not refused)."""
    assert SamplingOptions(1, qc_threshold=1.5).qc_threshold == 1.5


def test_sample_labels_retries_cuda_oom_with_half_batches(pipe, monkeypatch, caplog):
    expected = pipe.sample_labels(3, seed=4, **KW)
    original = pipe._generate_labels
    sizes: list[int] = []

    def stage(seeds, *args, **kwargs):
        sizes.append(len(seeds))
        if len(seeds) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return original(seeds, *args, **kwargs)

    monkeypatch.setattr(pipe, "_generate_labels", stage)
    with caplog.at_level(logging.WARNING, logger="duodiff.pipeline"):
        got = pipe.sample_labels(3, seed=4, **KW)
    assert torch.equal(got, expected) and sizes == [3, 1, 1, 1]
    assert "out of memory with a batch of 3; retrying with batches of 1" in caplog.text


# ---------------------------------------------------------------------------------------------- the retry loop alone
def _plan(**kwargs) -> SamplingPlan:
    opts = SamplingOptions(3, seed=0, class_volumes={"a": 1.0}, **kwargs)
    want = torch.log1p(torch.full((3, 2), 8.0))  # 8 voxels of class 1 requested; class 2 unconstrained
    mask = torch.tensor([[1.0, 0.0]] * 3)
    return SamplingPlan(opts, new_scheduler=lambda kind: None, amp=None, requested_volumes=want, volume_mask=mask)


def _labels_from_seeds(seeds: list[int], idx: list[int]) -> torch.Tensor:
    """Fake stage 1: an even seed gives the requested 8 voxels of class 1, an odd seed none."""
    lab = torch.zeros(len(seeds), 1, 2, 2, 2, dtype=torch.long)
    lab[[i for i, s in enumerate(seeds) if s % 2 == 0]] = 1
    return lab


def test_rejection_sampler_regenerates_rejected_samples_with_retry_seeds():
    sampler = RejectionSampler(_plan(volume_tolerance=0.1, max_retries=5), _labels_from_seeds,
                               lambda labels, seeds: labels.float(), num_classes=3)
    images, labels = sampler.pairs(0, 3)
    expected, retries = 1, 0
    while expected % 2:  # the odd seed 1 is replaced by its retry seeds until one is even
        retries += 1
        expected = retry_seed(expected, retries)
    assert sampler.seeds == [0, expected, 2] and 1 <= retries <= 5
    assert labels.flatten(1).eq(1).all() and torch.equal(images, labels.float())
    report = sampler.report()
    assert report["attempts"] == 3 + retries and report["volume_rejections"] == retries
    assert report["failed_seeds"] == [] and report["acceptance_rate"] == 3 / (3 + retries)
    assert "qc_dice" not in report


def test_rejection_sampler_keeps_samples_out_of_retries_and_lists_them():
    never = RejectionSampler(_plan(volume_tolerance=0.1, max_retries=2),
                             lambda seeds, idx: torch.zeros(len(seeds), 1, 2, 2, 2, dtype=torch.long),
                             lambda labels, seeds: labels.float(), num_classes=3)
    _, labels = never.pairs(0, 3)
    assert labels.shape == (3, 1, 2, 2, 2)  # nothing dropped
    report = never.report()
    assert report["attempts"] == 9 and report["volume_rejections"] == 9 and report["failed_seeds"] == never.seeds
    assert report["acceptance_rate"] == 0.0

"""CUDA out-of-memory during sampling: the batch is retried at half size, logged, nothing lost.

No GPU is needed: the OOM is injected where a real one would surface (inside a stage).
"""

from __future__ import annotations

import logging

import pytest
import torch

from duodiff.testing import tiny_pipeline


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def _fail_when_batch_exceeds(pipe, monkeypatch, name: str, limit: int) -> list[int]:
    original = getattr(pipe, name)
    sizes: list[int] = []

    def stage(*args, **kwargs):
        n = len(args[1] if name == "_generate_images" else args[0])
        sizes.append(n)
        if n > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return original(*args, **kwargs)

    monkeypatch.setattr(pipe, name, stage)
    return sizes


@pytest.mark.parametrize("stage", ["_generate_labels", "_generate_images"])
def test_sample_retries_with_half_batch_and_keeps_every_sample(pipe, monkeypatch, caplog, stage):
    common = dict(seed=10, num_inference_steps=2, progress=False)
    expected = pipe.sample(5, batch_size=5, **common)
    sizes = _fail_when_batch_exceeds(pipe, monkeypatch, stage, limit=2)
    with caplog.at_level(logging.WARNING, logger="duodiff.pipeline"):
        got = pipe.sample(5, batch_size=5, **common)
    assert got.seeds == expected.seeds == list(range(10, 15))
    assert torch.equal(got.labels, expected.labels)
    torch.testing.assert_close(got.images, expected.images, rtol=1e-5, atol=1e-5)
    assert sizes[:2] == [5, 2]  # 5 fails, then batches of 2
    assert "out of memory with a batch of 5; retrying with batches of 2" in caplog.text


def test_generate_images_retries_too(pipe, monkeypatch, caplog):
    labels = pipe.sample(3, seed=0, num_inference_steps=2, progress=False).labels
    expected = pipe.generate_images(labels, seed=0, num_inference_steps=2, progress=False)
    _fail_when_batch_exceeds(pipe, monkeypatch, "_generate_images", limit=1)
    with caplog.at_level(logging.WARNING, logger="duodiff.pipeline"):
        got = pipe.generate_images(labels, seed=0, num_inference_steps=2, progress=False)
    torch.testing.assert_close(got.images, expected.images, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.labels, labels)
    assert caplog.text.count("retrying") == 1


def test_oom_with_a_batch_of_one_is_raised(pipe, monkeypatch):
    _fail_when_batch_exceeds(pipe, monkeypatch, "_generate_labels", limit=0)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        pipe.sample(2, seed=0, num_inference_steps=2, progress=False)

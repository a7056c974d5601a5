"""Seeding: same seed -> same pair, different seeds -> different pairs, per-sample batch invariance."""

from __future__ import annotations

import pytest
import torch

from duodiff.sampling import denoise, initial_noise, stage_generators
from duodiff.schedulers import make_scheduler

STEPS = 2

# Batched convolutions round differently from single-sample ones (different kernels / accumulation
# order), so images of the same seed alone vs in a batch agree to ~1e-6, not bit for bit. Labels are
# argmaxes and are compared exactly.
BATCH_ATOL = 1e-4


def run(pipe, n, **kw):
    kw.setdefault("num_inference_steps", STEPS)
    return pipe.sample(n, progress=False, **kw)


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm"])
def test_same_seed_same_pair(tiny_pipe, scheduler):
    a = run(tiny_pipe, 2, seed=11, scheduler=scheduler)
    b = run(tiny_pipe, 2, seed=11, scheduler=scheduler)
    assert torch.equal(a.images, b.images)
    assert torch.equal(a.labels, b.labels)


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm"])
def test_different_seeds_different_pairs(tiny_pipe, scheduler):
    res = run(tiny_pipe, 3, seed=[1, 2, 1000], scheduler=scheduler)
    for i in range(3):
        for j in range(i + 1, 3):
            assert not torch.equal(res.images[i], res.images[j])
            assert not torch.equal(res.labels[i], res.labels[j])


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm"])
def test_batch_invariance(tiny_pipe, scheduler):
    batch = run(tiny_pipe, 8, seed=100, scheduler=scheduler)
    assert batch.seeds == list(range(100, 108))
    for i in (0, 3, 7):
        alone = run(tiny_pipe, 1, seed=100 + i, scheduler=scheduler)
        assert torch.equal(alone.labels[0], batch.labels[i]), f"labels of seed {100 + i} depend on the batch"
        torch.testing.assert_close(alone.images[0], batch.images[i], atol=BATCH_ATOL, rtol=0)


def test_batch_size_does_not_change_samples(tiny_pipe):
    full = run(tiny_pipe, 4, seed=7)
    chunked = run(tiny_pipe, 4, seed=7, batch_size=3)
    assert torch.equal(full.labels, chunked.labels)
    torch.testing.assert_close(full.images, chunked.images, atol=BATCH_ATOL, rtol=0)


def test_explicit_seed_list_matches_offset_seeds(tiny_pipe):
    a = run(tiny_pipe, 3, seed=20)
    b = run(tiny_pipe, 3, seed=[20, 21, 22])
    assert a.seeds == b.seeds == [20, 21, 22]
    assert torch.equal(a.labels, b.labels) and torch.equal(a.images, b.images)
    # a sample is reproduced from its reported seed
    c = run(tiny_pipe, 1, seed=a.seeds[2])
    assert torch.equal(c.labels[0], a.labels[2])
    torch.testing.assert_close(c.images[0], a.images[2], atol=BATCH_ATOL, rtol=0)


def test_generator_draws_reproducible_seeds(tiny_pipe):
    a = run(tiny_pipe, 2, generator=torch.Generator().manual_seed(3))
    b = run(tiny_pipe, 2, generator=torch.Generator().manual_seed(3))
    assert a.seeds == b.seeds and len(set(a.seeds)) == 2
    assert torch.equal(a.images, b.images)


def test_no_seed_gives_fresh_reported_seeds(tiny_pipe):
    a = run(tiny_pipe, 2)
    b = run(tiny_pipe, 2)
    assert a.seeds != b.seeds and all(s >= 0 for s in a.seeds + b.seeds)
    again = run(tiny_pipe, 2, seed=a.seeds)
    assert torch.equal(again.labels, a.labels)


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm"])
def test_generate_images_reproduces_stage_two(tiny_pipe, scheduler):
    full = run(tiny_pipe, 3, seed=40, scheduler=scheduler)
    stage2 = tiny_pipe.generate_images(full.labels, seed=40, num_inference_steps=STEPS, scheduler=scheduler,
                                       progress=False)
    assert torch.equal(stage2.labels, full.labels)
    assert stage2.seeds == full.seeds
    assert torch.equal(stage2.images, full.images)
    other = tiny_pipe.generate_images(full.labels, seed=41, num_inference_steps=STEPS, scheduler=scheduler,
                                      progress=False)
    assert not torch.equal(other.images[0], full.images[0])


def test_stage_generators_are_independent_per_stage_and_seed():
    la, lb = stage_generators([1, 2], "label")
    (ia,) = stage_generators([1], "image")
    x, y, z = (torch.randn(4, generator=g) for g in (la, lb, ia))
    assert not torch.equal(x, y) and not torch.equal(x, z)
    (la2,) = stage_generators([1], "label")
    assert torch.equal(torch.randn(4, generator=la2), x)
    with pytest.raises(ValueError, match="stage must be one of"):
        stage_generators([1], "mask")


def test_initial_noise_is_per_generator():
    gens = stage_generators([5, 6], "label")
    noise = initial_noise(gens, (3, 4, 4, 4), torch.device("cpu"))
    assert noise.shape == (2, 3, 4, 4, 4) and noise.dtype == torch.float32
    (g6,) = stage_generators([6], "label")
    assert torch.equal(initial_noise([g6], (3, 4, 4, 4), torch.device("cpu"))[0], noise[1])


def test_denoise_requires_controlnet_and_condition_together(tiny_pipe):
    sched = make_scheduler("ddim", tiny_pipe.config.scheduler)
    sched.set_timesteps(STEPS)
    gens = stage_generators([0], "image")
    noise = initial_noise(gens, tiny_pipe.config.image_latent_shape, torch.device("cpu"))
    with pytest.raises(ValueError, match="controlnet and condition must be given together"):
        denoise(tiny_pipe.image_unet, sched, noise, generators=gens, stochastic=False,
                controlnet=tiny_pipe.image_controlnet, progress=False)


def test_controlnet_training_and_sampling_predict_through_the_same_wiring():
    """The ControlNet stage trains the prediction the sampling loop makes: ControlledUNet (training) and
    model_output (denoise) give the same output, and the residuals really reach the UNet."""
    from duodiff.sampling import model_output
    from duodiff.testing import tiny_pipeline
    from duodiff.train.stages import ControlledUNet

    pipe = tiny_pipeline()  # randomised weights: a fresh UNet outputs exactly 0
    torch.manual_seed(0)
    x = torch.randn(2, *pipe.config.image_latent_shape)
    t = torch.tensor([3, 7])
    labels = torch.randint(0, 3, (2, 1, *pipe.config.volume_shape))
    cond = pipe.one_hot(labels)
    with torch.no_grad():
        sampled = model_output(pipe.image_unet, x, t, controlnet=pipe.image_controlnet, condition=cond)
        trained = ControlledUNet(pipe.image_unet, pipe.image_controlnet).eval()(x, t, cond)
        plain = pipe.image_unet(x=x, timesteps=t)
        unscaled = model_output(pipe.image_unet, x, t, controlnet=pipe.image_controlnet, condition=cond,
                                conditioning_scale=0.0)
    pipe.image_unet.requires_grad_(True)
    assert torch.equal(sampled, trained)
    assert not torch.allclose(sampled, plain)
    assert torch.allclose(unscaled, plain, atol=1e-6)

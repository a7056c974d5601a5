"""Samplers: diffusers' few-step solvers behind duodiff's scheduler contract, built from the training schedule."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch
from torch import nn

from duodiff.config import SchedulerConfig
from duodiff.sampling import denoise, initial_noise, stage_generators
from duodiff.schedulers import DIFFUSERS_SAMPLERS, make_scheduler
from tests.conftest import make_tiny

STEPS = 3
# batched convolutions round differently from single-sample ones: images agree to ~1e-6 (see test_sampling.py)
BATCH_ATOL = 1e-4
FEW_STEP = sorted(DIFFUSERS_SAMPLERS)

try:
    import diffusers  # noqa: F401

    HAVE_DIFFUSERS = True
except ImportError:
    HAVE_DIFFUSERS = False
needs_diffusers = pytest.mark.skipif(not HAVE_DIFFUSERS, reason="needs diffusers (pip install 'duodiff[samplers]')")


def label_latents(pipe, name: str, steps: int, cfg=None, seeds=(0,)) -> torch.Tensor:
    """Clean label latents of ``seeds`` after ``steps`` steps of sampler ``name`` (schedule ``cfg``)."""
    sched = make_scheduler(name, cfg or pipe.config.scheduler)
    sched.set_timesteps(steps)
    gens = stage_generators(list(seeds), "label")
    noise = initial_noise(gens, pipe.config.label_latent_shape, pipe.device)
    with torch.inference_mode():
        return denoise(pipe.label_unet, sched, noise, generators=gens, stochastic=False, progress=False)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@needs_diffusers
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("name", FEW_STEP)
def test_diffusers_sampler_gets_the_training_schedule(name, prediction_type):
    from monai.networks.schedulers import DDPMScheduler

    cfg = dataclasses.replace(make_tiny(3).config.scheduler, prediction_type=prediction_type)
    sched = make_scheduler(name, cfg)
    inner = sched.scheduler
    assert type(inner).__name__ == DIFFUSERS_SAMPLERS[name]
    assert inner.config.prediction_type == prediction_type
    assert inner.config.num_train_timesteps == cfg.num_train_timesteps
    monai = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, schedule=cfg.schedule,
                          beta_start=cfg.beta_start, beta_end=cfg.beta_end)
    torch.testing.assert_close(inner.alphas_cumprod.float(), monai.alphas_cumprod.float(), rtol=1e-5, atol=1e-7)
    sched.set_timesteps(10)
    ts = sched.timesteps.tolist()
    # spaced in log-SNR: from the noisiest timestep to t = 0, all different at 10 steps
    assert len(set(ts)) == 10 and ts[0] >= cfg.num_train_timesteps - 2 and ts[-1] == 0
    assert ts == sorted(ts, reverse=True)


@needs_diffusers
@pytest.mark.parametrize("name", FEW_STEP)
def test_few_step_samplers_are_batch_invariant(tiny_pipe, name, one_thread):
    """Sample i of a batch equals the same seed sampled alone (the solvers are per-sample elementwise)."""
    batch = tiny_pipe.sample(3, seed=100, num_inference_steps=STEPS, scheduler=name, progress=False)
    assert torch.isfinite(batch.images).all()
    for i in (0, 2):
        alone = tiny_pipe.sample(1, seed=100 + i, num_inference_steps=STEPS, scheduler=name, progress=False)
        assert torch.equal(alone.labels[0], batch.labels[i]), f"labels of seed {100 + i} depend on the batch"
        torch.testing.assert_close(alone.images[0], batch.images[i], atol=BATCH_ATOL, rtol=0)


@needs_diffusers
@pytest.mark.parametrize("name", FEW_STEP)
def test_few_step_samplers_differ_from_ddim_and_accept_every_entry_point(tiny_pipe, name, one_thread):
    ddim = tiny_pipe.sample_labels(2, seed=5, num_inference_steps=STEPS, scheduler="ddim", progress=False)
    labels = tiny_pipe.sample_labels(2, seed=5, num_inference_steps=STEPS, scheduler=name.upper(), progress=False)
    assert labels.shape == ddim.shape
    out = tiny_pipe.generate_images(labels, seed=5, num_inference_steps=STEPS, scheduler=name, progress=False)
    assert torch.isfinite(out.images).all() and torch.equal(out.labels, labels)
    a = label_latents(tiny_pipe, "ddim", STEPS)
    b = label_latents(tiny_pipe, name, STEPS)
    assert not torch.allclose(a, b)


class GaussianDenoiser(nn.Module):
    """What a perfectly trained UNet predicts when the data is ``N(mean, std^2)`` per voxel.

    Then the probability-flow ODE that every sampler here solves has a closed form: the standardised value
    ``(x_t - sqrt(a_t) mean) / sqrt(a_t std^2 + 1 - a_t)`` stays constant, so noise ``x_T`` ends at
    ``mean + std * (x_T - sqrt(a_T) mean) / sqrt(a_T std^2 + 1 - a_T)`` (:meth:`exact`).
    """

    def __init__(self, cfg, mean: float = 0.5, std: float = 0.5) -> None:
        super().__init__()
        from monai.networks.schedulers import DDPMScheduler

        self.alphas_cumprod = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, schedule=cfg.schedule,
                                            beta_start=cfg.beta_start, beta_end=cfg.beta_end).alphas_cumprod.double()
        self.prediction_type, self.mean, self.std = cfg.prediction_type, mean, std

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context=None) -> torch.Tensor:
        a = self.alphas_cumprod[timesteps.cpu()].view(-1, *[1] * (x.ndim - 1)).to(x.device)
        var = a * self.std**2 + 1 - a
        eps = (1 - a).sqrt() * (x.double() - a.sqrt() * self.mean) / var
        x0 = self.mean + a.sqrt() * self.std**2 * (x.double() - a.sqrt() * self.mean) / var
        out = {"epsilon": eps, "sample": x0, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0}
        return out[self.prediction_type].float()

    def exact(self, noise: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod[-1]
        return self.mean + self.std * (noise.double() - a.sqrt() * self.mean) / (a * self.std**2 + 1 - a).sqrt()


def ode_error(model: GaussianDenoiser, name: str, steps: int, cfg) -> float:
    """Relative L2 error of sampler ``name`` (built from ``cfg``) against the exact ODE solution."""
    noise = torch.randn(2, 1, 6, 6, 6, generator=torch.Generator().manual_seed(0))
    sched = make_scheduler(name, cfg)
    sched.set_timesteps(steps)
    with torch.inference_mode():
        out = denoise(model, sched, noise, generators=[torch.Generator()] * 2, stochastic=False, progress=False)
    exact = model.exact(noise)
    return float((out.double() - exact).norm() / (exact - model.mean).norm())


@needs_diffusers
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_few_step_solvers_solve_the_trained_ode(prediction_type, one_thread):
    """Against the exact answer (Gaussian data): DPM-Solver++ and UniPC at 20 steps are within 2 % (measured 0.6 %),
    far closer than DDIM at 20 steps (10 %), and at 200 steps as close as DDIM at 200 (2 %); reading the model's
    output as another parametrisation or with another beta schedule -- a wrong mapping -- is off by 6 % to 8000 %."""
    cfg = dataclasses.replace(make_tiny(3).config.scheduler, prediction_type=prediction_type)
    model = GaussianDenoiser(cfg)
    ddim_20, ddim_200 = ode_error(model, "ddim", 20, cfg), ode_error(model, "ddim", 200, cfg)
    assert ddim_200 < 0.03
    for name in FEW_STEP:
        err = ode_error(model, name, 20, cfg)
        assert err < 0.02 and err < ddim_20 / 2, (name, err, ddim_20)
        assert ode_error(model, name, 200, cfg) < 0.03
    for wrong in (dataclasses.replace(cfg, prediction_type="epsilon" if prediction_type != "epsilon" else "sample"),
                  dataclasses.replace(cfg, schedule="linear_beta")):
        assert ode_error(model, "dpmsolver++", 20, wrong) > 0.04, wrong


@pytest.mark.parametrize("name", ["pndm", *FEW_STEP])
def test_multistep_state_does_not_leak_between_stages(tiny_pipe, name, one_thread):
    """PNDM / DPM-Solver++ / UniPC keep earlier model outputs; each stage and batch gets a fresh scheduler, so
    generate_images reproduces stage 2 of sample (PNDM's label-stage history used to leak into the image stage)."""
    if name in DIFFUSERS_SAMPLERS and not HAVE_DIFFUSERS:
        pytest.skip("needs diffusers")
    full = tiny_pipe.sample(2, seed=40, num_inference_steps=STEPS, scheduler=name, batch_size=1, progress=False)
    stage2 = tiny_pipe.generate_images(full.labels, seed=40, num_inference_steps=STEPS, scheduler=name,
                                       progress=False)
    torch.testing.assert_close(stage2.images, full.images, atol=BATCH_ATOL, rtol=0)


@pytest.mark.parametrize("name", FEW_STEP)
def test_missing_diffusers_is_an_import_error_naming_the_extra(tiny_pipe, name, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` fail as if not installed
    with pytest.raises(ImportError) as e:
        tiny_pipe.sample(1, seed=0, num_inference_steps=STEPS, scheduler=name, progress=False)
    msg = str(e.value)
    assert f"scheduler={name!r} needs diffusers" in msg
    assert 'pip install "duodiff[samplers]"' in msg and 'pip install -e ".[samplers]"' in msg
    assert e.value.name == "diffusers"


def test_missing_diffusers_is_a_one_line_user_error_in_the_cli(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from duodiff.cli.main import main

    monkeypatch.setitem(sys.modules, "diffusers", None)
    code = main(["sample", "--model", str(tiny_model_dir), "-n", "1", "--steps", "2", "--scheduler", "dpmsolver++",
                 "--out", str(tmp_path / "out"), "--no-progress", "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "needs diffusers" in err and "duodiff[samplers]" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["ddpm", "ddim", "pndm"] + (FEW_STEP if HAVE_DIFFUSERS else []))
def test_every_sampler_builds_for_every_training_schedule(name):
    """Each schedule a config accepts gives each sampler (the cosine one takes no beta range: it used to crash)."""
    import math

    from duodiff.config import SchedulerConfig

    for schedule in ("linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine"):
        sched = make_scheduler(name, SchedulerConfig(schedule=schedule))
        sched.set_timesteps(10)
        assert len(sched.timesteps) >= 10 and int(sched.timesteps.max()) < 1000
    cosine = make_scheduler("ddpm", SchedulerConfig(schedule="cosine"))
    # Nichol & Dhariwal's alpha-bar at t = T / 2 with s = 0.008: cos^2(pi / 2 * (0.5 + s) / (1 + s))
    expected = math.cos(math.pi / 2 * (0.5 + 0.008) / 1.008) ** 2
    assert float(cosine.alphas_cumprod[499]) == pytest.approx(expected, rel=0.02)


def test_image_side_with_its_own_prediction_type_saves_loads_and_samples(tmp_path, one_thread):
    """A model whose image UNet predicts v while its label UNet predicts epsilon (``image_scheduler``): the image
    stage is sampled with the image schedule, the label stage with the label one, and the setting survives
    save / load; a model without it (all older models) uses ``scheduler`` for both."""
    from duodiff import DuoDiffusion
    from duodiff.sampling_options import stage_scheduler

    base = make_tiny(3)
    assert base.config.image_scheduler is None
    assert base.config.schedule_of("image") is base.config.scheduler
    v = base.config.scheduler.replace(prediction_type="v_prediction")
    pipe = DuoDiffusion(base.config.replace(image_scheduler=v), base.components())
    assert stage_scheduler(pipe, "ddim", 3, "image").prediction_type == "v_prediction"
    assert stage_scheduler(pipe, "ddim", 3, "label").prediction_type == "epsilon"
    pipe.save_pretrained(tmp_path / "m")
    loaded = DuoDiffusion.from_pretrained(tmp_path / "m")
    assert loaded.config.schedule_of("image") == v and loaded.config.schedule_of("label").prediction_type == "epsilon"
    assert "epsilon (label); v_prediction (image)" in (tmp_path / "m" / "README.md").read_text()
    # the image stage really follows the image schedule: same networks, other prediction type -> other images
    a = pipe.sample(1, seed=3, num_inference_steps=3, dtype="float32", progress=False)
    b = base.sample(1, seed=3, num_inference_steps=3, dtype="float32", progress=False)
    assert torch.equal(a.labels, b.labels)
    assert not torch.allclose(a.images, b.images)
    with pytest.raises(ValueError, match="kind must be 'label' or 'image'"):
        pipe.config.schedule_of("mask")


class GaussianFlow(nn.Module):
    """The exact rectified-flow velocity E[x0 - noise | x_t] for data ~ N(mean, std^2), x_t = (1-s) x0 + s noise,
    s = t / T: a "UNet" whose sampled result is known (the flow maps noise n to mean + std * n)."""

    def __init__(self, mean: float, std: float, num_train_timesteps: int = 1000) -> None:
        super().__init__()
        self.mean, self.std, self.T = mean, std, num_train_timesteps

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context=None) -> torch.Tensor:
        s = (timesteps.double() / self.T).view(-1, *[1] * (x.ndim - 1))
        a, var = 1 - s, (1 - s) ** 2 * self.std**2 + s**2
        centred = x.double() - a * self.mean
        return (self.mean + a * self.std**2 * centred / var - s * centred / var).float()


def flow_error(model: GaussianFlow, steps: int) -> float:
    noise = torch.randn(2, 1, 6, 6, 6, generator=torch.Generator().manual_seed(0))
    sched = make_scheduler("rflow", SchedulerConfig(prediction_type="rectified_flow"))
    sched.set_timesteps(steps)
    with torch.inference_mode():
        out = denoise(model, sched, noise, generators=[torch.Generator()] * 2, stochastic=False, progress=False)
    exact = model.mean + model.std * noise.double()
    return float((out.double() - exact).norm() / (noise.double().norm() * (model.std or 1.0)))


def test_rflow_sampler_follows_the_learned_velocity():
    """Euler steps of the rflow sampler: exact for straight paths (a single data point, any step count, including
    uneven rounded steps), and on Gaussian data first-order convergence to the exact flow (measured: 26 % at 5
    steps, 2.9 % at 50, 1.5 % at 100, 0.7 % at 200: the error halves when the steps double; a wrong step size,
    e.g. skipping the last step to t = 0, would stall)."""
    assert flow_error(GaussianFlow(0.7, 0.0), 7) < 1e-5
    assert flow_error(GaussianFlow(0.7, 0.0), 3) < 1e-5
    gauss = GaussianFlow(0.5, 0.5)
    e50, e100, e200 = flow_error(gauss, 50), flow_error(gauss, 100), flow_error(gauss, 200)
    assert e50 < 0.04 and 0.4 < e100 / e50 < 0.6 and 0.4 < e200 / e100 < 0.6 and e200 < 0.01, (e50, e100, e200)
    sched = make_scheduler("rflow", SchedulerConfig(prediction_type="rectified_flow"))
    sched.set_timesteps(3)
    assert sched.timesteps.tolist() == [1000, 667, 333] and sched.timesteps.dtype == torch.int64


def test_rflow_only_for_rectified_flow_models_and_the_default_follows_the_model():
    from duodiff.schedulers import RFlowSampler, default_sampler, sampler_label

    flow, eps = SchedulerConfig(prediction_type="rectified_flow"), SchedulerConfig()
    with pytest.raises(ValueError, match="scheduler='ddim' cannot sample a model trained with "
                                         "prediction_type='rectified_flow': use scheduler='rflow'"):
        make_scheduler("ddim", flow)
    with pytest.raises(ValueError, match="'rflow' samples models trained with rectified flow; use 'ddim'"):
        make_scheduler("rflow", eps)
    assert isinstance(make_scheduler(None, flow), RFlowSampler)
    assert type(make_scheduler(None, eps)).__name__ == "DDIMScheduler"
    assert (default_sampler(flow), default_sampler(eps)) == ("rflow", "ddim")
    assert sampler_label(None, [eps, flow]) == "DDIM/RFLOW" and sampler_label("pndm", [eps, flow]) == "PNDM"
    assert sampler_label(None, [eps, eps]) == "DDIM"


def test_a_model_with_a_rectified_flow_image_side_samples_each_stage_with_its_own_sampler(one_thread):
    """Label side epsilon, image side rectified flow: the default (scheduler=None) takes DDIM for labels and rflow
    for images; the same seed gives the same pair in a batch and alone; naming one sampler for both is refused."""
    from duodiff import DuoDiffusion
    from duodiff.sampling_options import stage_scheduler
    from duodiff.schedulers import RFlowSampler

    base = make_tiny(3)
    pipe = DuoDiffusion(base.config.replace(image_scheduler=SchedulerConfig(prediction_type="rectified_flow")),
                        base.components())
    assert isinstance(stage_scheduler(pipe, None, 3, "image"), RFlowSampler)
    assert type(stage_scheduler(pipe, None, 3, "label")).__name__ == "DDIMScheduler"
    both = pipe.sample(2, seed=[4, 5], num_inference_steps=3, dtype="float32", progress=False)
    alone = pipe.sample(1, seed=5, num_inference_steps=3, dtype="float32", progress=False)
    assert torch.equal(both.labels[1:], alone.labels)
    torch.testing.assert_close(both.images[1:], alone.images, atol=BATCH_ATOL, rtol=0)
    with pytest.raises(ValueError, match="use scheduler='rflow'"):
        pipe.sample(1, seed=0, num_inference_steps=3, scheduler="ddim", progress=False)

"""Samplers, all built from the one training schedule: MONAI's, and diffusers' few-step solvers (optional).

``make_scheduler("ddim", cfg)`` returns a fresh scheduler; the sampling loop only uses the tiny contract
``set_timesteps(n, device=...)`` + ``timesteps`` + ``step(model_output, t, sample)[0]`` (the previous sample).

* ``"ddpm"``, ``"ddim"``, ``"pndm"``: MONAI's schedulers (``monai.networks.schedulers``).
* ``"dpmsolver++"`` (DPM-Solver++ 2M, Lu et al. 2022) and ``"unipc"`` (UniPC-bh2, Zhao et al. 2023): multistep
  ODE solvers made for 10-20 steps, from diffusers (``pip install "duodiff[samplers]"``). They are given the
  trained schedule's exact betas (``trained_betas``) and ``prediction_type``; second order with a first-order
  last step (``lower_order_final``) that ends at sigma 0 (``final_sigmas_type="zero"``: a clean sample, as
  MONAI's DDIM with ``set_alpha_to_one``). Their steps are spaced uniformly in log-SNR (DPM-Solver++:
  ``use_lu_lambdas``, as in Lu et al.) or log-sigma (UniPC: ``use_exponential_sigmas``) from ``t = T - 1`` down to
  ``t = 0``. On Gaussian data, where the exact ODE solution is known (``tests/test_schedulers.py``, mean 0.5,
  std 0.5), that spacing gives 2-4 % error at 10 steps and under 1 % at 20, where MONAI's DDIM gives 12 % and
  10 %; diffusers' default ``timestep_spacing="linspace"`` gave 10 % and 4 % (std 1) or 46 % and 30 % (std 0.3):
  its last model call is at ``t = T / n``, so its result is the posterior mean there. With 50 or more steps a
  few steps near ``t = 0`` share an integer timestep.

* ``"rflow"``: Euler steps along the learned velocity of a model trained with rectified flow
  (``prediction_type="rectified_flow"``: Liu et al. 2023, "Flow Straight and Fast"; the objective of NVIDIA MAISI's
  3D latent diffusion), MONAI's ``RFlowScheduler``. The only sampler of such a model; the other samplers are for
  models trained with a noise schedule (``epsilon`` / ``v_prediction``).

``scheduler=None`` (the default, :data:`DEFAULT_SCHEDULER`) means each stage's own sampler
(:func:`default_sampler`): DDIM for a stage trained with a noise schedule, ``rflow`` for one trained with rectified
flow. Multistep samplers (PNDM, DPM-Solver++, UniPC) keep the previous steps' model outputs: a scheduler serves one
denoising run. Make a new one for every call of :func:`duodiff.sampling.denoise`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from .config import SchedulerConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "SAMPLERS",
    "DEFAULT_SCHEDULER",
    "RECTIFIED_FLOW",
    "RFlowSampler",
    "default_sampler",
    "sampler_label",
    "check_sampler_fits",
    "schedules",
    "DEFAULT_NUM_INFERENCE_STEPS",
    "REFERENCE_NUM_INFERENCE_STEPS",
    "STOCHASTIC_SAMPLERS",
    "DIFFUSERS_SAMPLERS",
    "Sampler",
    "DiffusersSampler",
    "make_scheduler",
    "check_scheduler_name",
    "check_num_inference_steps",
]

#: Sampler names accepted by ``DuoDiffusion.sample(scheduler=...)`` and ``duodiff sample --scheduler``.
SAMPLERS = ("ddpm", "ddim", "pndm", "dpmsolver++", "unipc", "rflow")
#: The ``prediction_type`` of a model trained with rectified flow (velocity ``x0 - noise`` on the straight path
#: ``x_t = (1 - t/T) x0 + (t/T) noise``, MONAI's ``RFlowScheduler`` convention); ``"rflow"`` is its sampler.
RECTIFIED_FLOW = "rectified_flow"
#: The default sampler and step count of every generating entry point (``sample``, ``sample_labels``,
#: ``generate_images``, the datasets, ``export``, ``duodiff sample`` / ``export``). ``None``: each stage's own
#: (:func:`default_sampler`: DDIM, or ``rflow`` for a stage trained with rectified flow). Chosen by the
#: quality-vs-steps sweep of ``benchmarks/bench_sampling.py`` (``benchmarks/results/bench_sampling_cpu.md``,
#: docs/performance.md): DDIM meets equal quality with DDIM-50 from 10 steps on (label-volume medians within 5 %,
#: pair consistency within 0.02, FID-2.5D within 10 %); the default takes twice that, 20, as a margin for harder
#: models. DDIM is MONAI's, so the default needs no optional extra.
DEFAULT_SCHEDULER: str | None = None
DEFAULT_NUM_INFERENCE_STEPS = 20
#: The reference sampler of quality measurements (``duodiff evaluate``, the benchmarks): every published number
#: was measured with it, and the sweep compares each sampler against it.
REFERENCE_NUM_INFERENCE_STEPS = 50
#: Samplers that draw fresh noise at every step (seeded per sample by the sampling loop).
STOCHASTIC_SAMPLERS = ("ddpm",)
#: Samplers taken from diffusers (the ``samplers`` extra): name -> diffusers class name.
DIFFUSERS_SAMPLERS = {"dpmsolver++": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler"}

#: duodiff's (MONAI's) ``prediction_type`` -> diffusers' name for the same parametrisation.
_DIFFUSERS_PREDICTION_TYPE = {"epsilon": "epsilon", "v_prediction": "v_prediction", "sample": "sample"}


class Sampler(Protocol):
    """What :func:`duodiff.sampling.denoise` needs of a scheduler."""

    timesteps: torch.Tensor

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None: ...

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor) -> tuple[torch.Tensor, Any]: ...


class DiffusersSampler:
    """A diffusers multistep scheduler behind duodiff's sampler contract.

    ``step`` returns ``(previous sample, None)`` like MONAI's ``(previous sample, predicted x0)``; the wrapped
    scheduler is ``.scheduler``.

    Args:
        scheduler: a diffusers ``SchedulerMixin`` (e.g. ``DPMSolverMultistepScheduler``).
    """

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    @property
    def timesteps(self) -> torch.Tensor:
        """int64 ``(num_inference_steps,)`` timesteps, first (noisiest) first."""
        return self.scheduler.timesteps

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        self.scheduler.set_timesteps(num_inference_steps, device=device)

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor) -> tuple[torch.Tensor, None]:
        """One solver step: ``x_t`` (``sample``, float32 ``(B, C, h, w, d)``) -> ``x_{t-1}``, same shape."""
        return self.scheduler.step(model_output, timestep, sample, return_dict=False)[0], None

    def __repr__(self) -> str:
        return f"DiffusersSampler({type(self.scheduler).__name__})"


class RFlowSampler:
    """MONAI's ``RFlowScheduler`` behind duodiff's sampler contract: Euler steps along the predicted velocity.

    ``step(v, t, x)`` moves ``x`` from ``t`` to the next of :attr:`timesteps` (0 after the last):
    ``x + (t - t_next) / T * v``, exact for straight paths. Timesteps are ``round((1 - i/n) * T)``, ``i < n``.

    Args:
        cfg: the training schedule (``num_train_timesteps``; ``prediction_type`` must be ``"rectified_flow"``).
    """

    def __init__(self, cfg: SchedulerConfig) -> None:
        from monai.networks.schedulers import RFlowScheduler

        self.scheduler = RFlowScheduler(num_train_timesteps=cfg.num_train_timesteps, use_discrete_timesteps=True)
        self._next: dict[int, int] = {}

    @property
    def timesteps(self) -> torch.Tensor:
        """int64 ``(num_inference_steps,)`` timesteps, first (``T``, pure noise) first."""
        return self.scheduler.timesteps

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        ts = [int(t) for t in self.scheduler.timesteps.tolist()]
        self._next = dict(zip(ts, [*ts[1:], 0]))

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """One Euler step: ``x_t`` (``sample``, float32 ``(B, C, h, w, d)``) -> ``x_{t_next}``, same shape, and the
        clean-sample estimate."""
        return self.scheduler.step(model_output, int(timestep), sample, self._next[int(timestep)])

    def __repr__(self) -> str:
        return "RFlowSampler(RFlowScheduler)"


def check_scheduler_name(name: str | None) -> str | None:
    """The lower-case sampler name (``None`` stays ``None``: each stage's own); ``ValueError`` if it is not one of
    :data:`SAMPLERS`."""
    if name is None:
        return None
    key = name.lower() if isinstance(name, str) else name
    if key not in SAMPLERS:
        raise ValueError(f"scheduler must be one of {list(SAMPLERS)} or None (each stage's own), got {name!r}.")
    return key


def default_sampler(cfg: SchedulerConfig) -> str:
    """The sampler of a stage trained with ``cfg`` when none is asked for: ``"rflow"`` for rectified flow, else
    ``"ddim"``."""
    return "rflow" if cfg.prediction_type == RECTIFIED_FLOW else "ddim"


def schedules(pipe: Any) -> tuple[SchedulerConfig, SchedulerConfig]:
    """The label and image training schedules of a :class:`~duodiff.DuoDiffusion` model."""
    return pipe.config.schedule_of("label"), pipe.config.schedule_of("image")


def check_sampler_fits(name: str | None, pipe: Any) -> None:
    """Raise the ``ValueError`` of :func:`make_scheduler` now if sampler ``name`` does not fit how a stage of
    ``pipe`` was trained (commands call it before they write or announce anything)."""
    for cfg in schedules(pipe):
        make_scheduler(name, cfg)


def sampler_label(name: str | None, cfgs: Sequence[SchedulerConfig]) -> str:
    """How a run's sampler is shown (``"DDIM"``, ``"RFLOW"``, ``"DDIM/RFLOW"``): ``name``, else each stage's own."""
    names = [name] if name is not None else list(dict.fromkeys(default_sampler(c) for c in cfgs))
    return "/".join(n.upper() for n in names)


def make_scheduler(name: str | None, cfg: SchedulerConfig) -> Sampler:
    """A fresh sampler named ``name`` for the training schedule ``cfg``.

    Args:
        name: one of :data:`SAMPLERS` (case-insensitive), or ``None`` for :func:`default_sampler`.
        cfg: the schedule the UNets were trained with (``num_train_timesteps``, betas, ``prediction_type``).

    Raises:
        ValueError: unknown ``name``, or a sampler that does not fit how the model was trained (``"rflow"`` for a
            noise-schedule model, any other for a rectified-flow one).
        ImportError: ``"dpmsolver++"`` / ``"unipc"`` without diffusers installed; the message says what to install.
    """
    from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, PNDMScheduler

    key = check_scheduler_name(name)
    if key is None:
        key = default_sampler(cfg)
    if cfg.prediction_type == RECTIFIED_FLOW or key == "rflow":
        if key != "rflow" or cfg.prediction_type != RECTIFIED_FLOW:
            raise ValueError(
                f"scheduler={key!r} cannot sample a model trained with prediction_type={cfg.prediction_type!r}: "
                + ("use scheduler='rflow' (or leave it unset)." if key != "rflow" else
                   "'rflow' samples models trained with rectified flow; use 'ddim' (or leave it unset).")
            )
        return RFlowSampler(cfg)
    common: dict[str, Any] = dict(
        num_train_timesteps=cfg.num_train_timesteps, schedule=cfg.schedule, prediction_type=cfg.prediction_type
    )
    if cfg.schedule != "cosine":  # MONAI's cosine schedule (Nichol & Dhariwal 2021) takes no beta range
        common.update(beta_start=cfg.beta_start, beta_end=cfg.beta_end)
    if key == "ddpm":
        return DDPMScheduler(clip_sample=False, **common)
    if key == "ddim":
        return DDIMScheduler(clip_sample=False, set_alpha_to_one=True, **common)
    if key == "pndm":
        return PNDMScheduler(skip_prk_steps=True, **common)
    # diffusers' solvers get MONAI's betas of the same schedule, so both sample the model's trained process
    betas = DDPMScheduler(**common).betas
    return _diffusers_sampler(key, cfg, betas)


def _diffusers_sampler(key: str, cfg: SchedulerConfig, betas: torch.Tensor) -> DiffusersSampler:
    """``"dpmsolver++"`` / ``"unipc"`` from diffusers with the trained ``betas`` (float32 ``(T,)``)."""
    install = 'pip install "duodiff[samplers]" (in a clone of duodiff: pip install -e ".[samplers]")'
    try:
        from diffusers import schedulers as diffusers_schedulers

        cls = getattr(diffusers_schedulers, DIFFUSERS_SAMPLERS[key])
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "diffusers":
            raise
        raise ImportError(f"scheduler={key!r} needs diffusers, which is not installed: {install}, or use "
                          "scheduler='ddim'.", name="diffusers") from e
    except (ImportError, AttributeError) as e:
        raise ImportError(f"scheduler={key!r} needs diffusers >= 0.30; the installed one failed to provide "
                          f"{DIFFUSERS_SAMPLERS[key]} ({e}). Update it: {install}.", name="diffusers") from e
    common: dict[str, Any] = dict(
        num_train_timesteps=cfg.num_train_timesteps,
        trained_betas=betas.double().tolist(),
        prediction_type=_DIFFUSERS_PREDICTION_TYPE[cfg.prediction_type],
        solver_order=2,
        lower_order_final=True,
        final_sigmas_type="zero",
        thresholding=False,
    )
    if key == "dpmsolver++":
        return DiffusersSampler(cls(algorithm_type="dpmsolver++", solver_type="midpoint", use_lu_lambdas=True,
                                    **common))
    return DiffusersSampler(cls(predict_x0=True, solver_type="bh2", use_exponential_sigmas=True, **common))


def check_num_inference_steps(num_inference_steps: int, cfg: SchedulerConfig) -> None:
    """Raise if ``num_inference_steps`` is not in ``1..num_train_timesteps``."""
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
        raise TypeError(f"num_inference_steps must be an int, got {num_inference_steps!r}.")
    if not 1 <= num_inference_steps <= cfg.num_train_timesteps:
        raise ValueError(
            f"num_inference_steps must be between 1 and num_train_timesteps ({cfg.num_train_timesteps}), "
            f"got {num_inference_steps}. Lower num_inference_steps or use a model trained with more timesteps."
        )

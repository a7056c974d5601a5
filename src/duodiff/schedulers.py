"""Samplers over MONAI's schedulers, all built from the one training schedule.

``make_scheduler("ddim", cfg)`` returns a fresh MONAI scheduler; the sampling loop only uses the
tiny contract ``set_timesteps(n)`` + ``timesteps`` + ``step(model_output, t, sample)``.
"""

from __future__ import annotations

from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, PNDMScheduler, Scheduler

from .config import SchedulerConfig

__all__ = ["SAMPLERS", "STOCHASTIC_SAMPLERS", "make_scheduler", "check_num_inference_steps"]

#: Sampler names accepted by ``DuoDiffusion.sample(scheduler=...)``.
SAMPLERS = ("ddpm", "ddim", "pndm")
#: Samplers that draw fresh noise at every step (seeded per sample by the sampling loop).
STOCHASTIC_SAMPLERS = ("ddpm",)


def make_scheduler(name: str, cfg: SchedulerConfig) -> Scheduler:
    """A fresh MONAI scheduler named ``name`` with the training schedule ``cfg``.

    Args:
        name: ``"ddpm"``, ``"ddim"`` or ``"pndm"`` (case-insensitive).
        cfg: the schedule the UNets were trained with.
    """
    key = name.lower() if isinstance(name, str) else name
    common = dict(
        num_train_timesteps=cfg.num_train_timesteps,
        schedule=cfg.schedule,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        prediction_type=cfg.prediction_type,
    )
    if key == "ddpm":
        return DDPMScheduler(clip_sample=False, **common)
    if key == "ddim":
        return DDIMScheduler(clip_sample=False, set_alpha_to_one=True, **common)
    if key == "pndm":
        return PNDMScheduler(skip_prk_steps=True, **common)
    raise ValueError(f"scheduler must be one of {list(SAMPLERS)}, got {name!r}.")


def check_num_inference_steps(num_inference_steps: int, cfg: SchedulerConfig) -> None:
    """Raise if ``num_inference_steps`` is not in ``1..num_train_timesteps``."""
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
        raise TypeError(f"num_inference_steps must be an int, got {num_inference_steps!r}.")
    if not 1 <= num_inference_steps <= cfg.num_train_timesteps:
        raise ValueError(
            f"num_inference_steps must be between 1 and num_train_timesteps ({cfg.num_train_timesteps}), "
            f"got {num_inference_steps}. Lower num_inference_steps or use a model trained with more timesteps."
        )

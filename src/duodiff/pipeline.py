"""`DuoDiffusion`: a label LDM and a ControlNet-conditioned image LDM that sample paired volumes.

Stage 1 denoises a label latent and decodes it into a segmentation map; stage 2 denoises an image
latent with a ControlNet that sees the one-hot label map at image resolution (the FOSCU design).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import keys
from .config import PipelineConfig
from .io import spacing_affine
from .models import build_component
from .output import DuoSample
from .presets import make_config
from .sampling import denoise, initial_noise, is_stochastic, stage_generators
from .schedulers import check_num_inference_steps, make_scheduler

__all__ = ["DuoDiffusion", "resolve_dtype"]

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Map ``"bf16"``/``"float16"``/``torch.float32``/... to a torch dtype (``None`` stays ``None``)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if isinstance(dtype, torch.dtype) and dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}.")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or a torch dtype, got {dtype!r}.")


class DuoDiffusion:
    """Generates paired (image, label) volumes with two latent diffusion models.

    Components (MONAI networks): ``label_autoencoder``, ``label_unet``, ``image_autoencoder``,
    ``image_unet``, ``image_controlnet``; the noise schedule and volume metadata live in ``config``.

    Example:
        >>> from duodiff import DuoDiffusion
        >>> pipe = DuoDiffusion.from_preset("tiny", num_classes=3)
        >>> out = pipe.sample(2, seed=0, num_inference_steps=2, progress=False)
        >>> tuple(out.images.shape), tuple(out.labels.shape)
        ((2, 1, 16, 16, 16), (2, 1, 16, 16, 16))
    """

    def __init__(self, config: PipelineConfig, components: Mapping[str, nn.Module]) -> None:
        if not isinstance(config, PipelineConfig):
            raise TypeError(f"config must be a PipelineConfig, got {type(config).__name__}.")
        missing = [k for k in keys.COMPONENTS if k not in components]
        extra = sorted(set(components) - set(keys.COMPONENTS))
        if missing or extra:
            raise ValueError(
                f"DuoDiffusion needs exactly the components {list(keys.COMPONENTS)}; missing {missing}, "
                f"unexpected {extra}."
            )
        self.config = config
        for name in keys.COMPONENTS:
            module = components[name]
            if not isinstance(module, nn.Module):
                raise TypeError(f"{name} must be a torch.nn.Module, got {type(module).__name__}.")
            module.eval()
            setattr(self, name, module)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: PipelineConfig, *, init_seed: int | None = 0) -> DuoDiffusion:
        """An untrained pipeline with freshly initialised weights (seeded by ``init_seed``, RNG state restored)."""
        with torch.random.fork_rng(devices=[]):
            if init_seed is not None:
                torch.manual_seed(init_seed)
            comps = {name: build_component(name, config) for name in keys.COMPONENTS}
        return cls(config, comps)

    @classmethod
    def from_preset(
        cls,
        name: str,
        *,
        num_classes: int,
        volume_shape: Sequence[int] | None = None,
        spacing: Sequence[float] = (1.0, 1.0, 1.0),
        label_names: Sequence[str] | None = None,
        image_channels: int = 1,
        prediction_type: str = "epsilon",
        attributes: Sequence[str] = (),
        init_seed: int | None = 0,
    ) -> DuoDiffusion:
        """An untrained pipeline of a named architecture (``"tiny"``, ``"hippocampus"``, ``"paper"``).

        See :func:`duodiff.presets.make_config` for the arguments.
        """
        cfg = make_config(
            name, num_classes=num_classes, volume_shape=volume_shape, spacing=spacing, label_names=label_names,
            image_channels=image_channels, prediction_type=prediction_type, attributes=attributes,
        )
        return cls.from_config(cfg, init_seed=init_seed)

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, **kwargs: Any) -> DuoDiffusion:
        """Load from a folder written by :meth:`save_pretrained` or a Hub repo id.

        Keyword arguments: ``revision``, ``variant`` (``None`` or ``"fp16"``), ``dtype``, ``device``,
        ``cache_dir``, ``local_files_only``, ``token``. See :func:`duodiff.hub.load_pipeline`.
        """
        from .hub import load_pipeline

        return load_pipeline(cls, path_or_repo_id, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, *, variant: str | None = None) -> None:
        """Write ``model_index.json`` + one folder per component (config + safetensors), atomically."""
        from .hub import save_pipeline

        save_pipeline(self, save_directory, variant=variant)

    def push_to_hub(self, repo_id: str, *, private: bool = False, token: str | None = None, **kwargs: Any) -> str:
        """Upload to the Hugging Face Hub with a generated model card; returns the commit URL."""
        from .hub import push_pipeline

        return push_pipeline(self, repo_id, private=private, token=token, **kwargs)

    # ------------------------------------------------------------------ properties
    def components(self) -> dict[str, nn.Module]:
        """The five networks by name."""
        return {name: getattr(self, name) for name in keys.COMPONENTS}

    def modules(self) -> Iterator[nn.Module]:
        yield from self.components().values()

    @property
    def device(self) -> torch.device:
        """Device of the networks."""
        return next(self.label_unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Parameter dtype of the networks."""
        return next(self.label_unet.parameters()).dtype

    @property
    def affine(self) -> np.ndarray:
        """float64 (4, 4) voxel-to-RAS-mm affine of generated volumes."""
        return spacing_affine(self.config.spacing)

    def to(self, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> DuoDiffusion:
        """Move (and optionally cast) every network in place; returns ``self``."""
        dt = resolve_dtype(dtype)
        for m in self.modules():
            m.to(device=device, dtype=dt)
        return self

    def __repr__(self) -> str:
        from .models import count_parameters

        c = self.config
        parts = ", ".join(f"{n}={count_parameters(getattr(self, n)) / 1e6:.2f}M" for n in keys.COMPONENTS)
        return (
            f"DuoDiffusion(volume_shape={c.volume_shape}, spacing={c.spacing}, label_names={list(c.label_names)}, "
            f"image_channels={c.image_channels}, {parts}, device={self.device})"
        )

    # ------------------------------------------------------------------ helpers
    def _autocast(self, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
        if dtype is None or dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def one_hot(self, labels: torch.Tensor) -> torch.Tensor:
        """int64 ``(N, 1, H, W, D)`` ids -> float32 ``(N, K, H, W, D)`` one-hot (background included)."""
        oh = F.one_hot(labels[:, 0].long(), self.config.num_classes)  # (N, H, W, D, K)
        return oh.movedim(-1, 1).float()

    @torch.inference_mode()
    def decode_labels(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled label latents ``(N, C, h, w, d)`` -> int64 label ids ``(N, 1, H, W, D)``."""
        logits = self.label_autoencoder.decode(latents / self.config.label_scale_factor)
        return logits.float().argmax(dim=1, keepdim=True)

    @torch.inference_mode()
    def decode_images(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled image latents ``(N, C, h, w, d)`` -> float32 images ``(N, C_img, H, W, D)`` clamped to [0, 1]."""
        img = self.image_autoencoder.decode(latents / self.config.image_scale_factor)
        return img.float().clamp_(0.0, 1.0)

    @staticmethod
    def _resolve_seeds(n: int, seed: int | Sequence[int] | None, generator: torch.Generator | None) -> list[int]:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"num_samples must be a positive int, got {n!r}.")
        if seed is not None and generator is not None:
            raise ValueError("Pass either seed or generator, not both.")
        if isinstance(seed, (list, tuple)):
            if len(seed) != n:
                raise ValueError(f"Got {len(seed)} seeds for {n} samples; pass one seed per sample or a single int.")
            seeds = [int(s) for s in seed]
        elif seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
                raise TypeError(f"seed must be an int or a list of ints, got {seed!r}.")
            seeds = [int(seed) + i for i in range(n)]
        elif generator is not None:
            seeds = torch.randint(0, 2**62, (n,), generator=generator).tolist()
        else:
            base = secrets.randbits(62)
            seeds = [base + i for i in range(n)]
        if any(s < 0 for s in seeds):
            raise ValueError(f"seeds must be >= 0, got {min(seeds)}.")
        return seeds

    @staticmethod
    def _batch_size(n: int, batch_size: int | None) -> int:
        if batch_size is None:
            return n
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}.")
        return batch_size

    def validate_labels(self, labels: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Check user label maps and return int64 ``(N, 1, H, W, D)`` on the pipeline's device.

        Accepts ``(N, 1, H, W, D)`` or ``(N, H, W, D)`` integer arrays with ids in ``range(num_classes)``
        and ``(H, W, D) == config.volume_shape``.
        """
        if isinstance(labels, np.ndarray):
            labels = torch.from_numpy(labels)
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor or numpy array, got {type(labels).__name__}.")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(
                f"labels must have an integer dtype (class ids), got {labels.dtype}. Convert with "
                "labels.round().long() if they are integral floats, or argmax one-hot maps first."
            )
        shape = tuple(self.config.volume_shape)
        if labels.ndim == 4:
            labels = labels[:, None]
        if labels.ndim != 5 or labels.shape[1] != 1 or tuple(labels.shape[2:]) != shape:
            raise ValueError(
                f"labels must have shape (N, 1, {', '.join(map(str, shape))}) or (N, {', '.join(map(str, shape))}), "
                f"got {tuple(labels.shape)}. This model generates volumes of shape {shape}; crop or pad your "
                "labels to it."
            )
        if labels.shape[0] == 0:
            raise ValueError("labels is empty (N=0); pass at least one label map.")
        if labels.dtype in (torch.uint16, torch.uint32, torch.uint64):  # torch has no min/max for these
            labels = labels.to(torch.int64)
        lo, hi = int(labels.min()), int(labels.max())
        k = self.config.num_classes
        if lo < 0 or hi >= k:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"label ids must be in range(0, {k}) for this model ({list(self.config.label_names)}), "
                f"found id {bad}. Remap your labels to 0..{k - 1}."
            )
        return labels.to(self.device, torch.long)

    # ------------------------------------------------------------------ sampling
    def _prepare(self, scheduler: str, num_inference_steps: int, conditioning_scale: float, dtype: Any):
        check_num_inference_steps(num_inference_steps, self.config.scheduler)
        if not isinstance(conditioning_scale, (int, float)) or isinstance(conditioning_scale, bool):
            raise TypeError(f"conditioning_scale must be a number, got {conditioning_scale!r}.")
        amp = resolve_dtype(dtype)
        weights = self.dtype
        if weights != torch.float32:
            # low-precision weights (``to(dtype=...)`` / ``from_pretrained(dtype=...)``) need autocast to match
            if amp is None:
                amp = weights
            elif amp != weights:
                raise ValueError(
                    f"dtype={dtype!r} does not match the pipeline's {weights} weights. Pass dtype=None (autocast to "
                    f"{weights}) or cast the weights first with pipe.to(dtype=...)."
                )
        sched = make_scheduler(scheduler, self.config.scheduler)
        sched.set_timesteps(num_inference_steps, device=self.device)
        return sched, amp

    def _generate_labels(self, seeds, sched, stochastic, amp, progress) -> torch.Tensor:
        gens = stage_generators(seeds, "label")
        noise = initial_noise(gens, self.config.label_latent_shape, self.device)
        with self._autocast(amp):
            z = denoise(self.label_unet, sched, noise, generators=gens, stochastic=stochastic, progress=progress,
                        desc="labels")
            return self.decode_labels(z)

    def _generate_images(self, labels, seeds, sched, stochastic, conditioning_scale, amp, progress) -> torch.Tensor:
        gens = stage_generators(seeds, "image")
        noise = initial_noise(gens, self.config.image_latent_shape, self.device)
        with self._autocast(amp):
            z = denoise(self.image_unet, sched, noise, generators=gens, stochastic=stochastic,
                        controlnet=self.image_controlnet, condition=self.one_hot(labels),
                        conditioning_scale=conditioning_scale, progress=progress, desc="images")
            return self.decode_images(z)

    def _result(self, images: list[torch.Tensor], labels: list[torch.Tensor], seeds: list[int]) -> DuoSample:
        c = self.config
        return DuoSample(
            images=torch.cat(images).cpu(), labels=torch.cat(labels).cpu(), affine=self.affine,
            spacing=c.spacing, label_names=c.label_names, seeds=seeds,
        )

    @torch.inference_mode()
    def sample(
        self,
        num_samples: int,
        *,
        seed: int | Sequence[int] | None = None,
        generator: torch.Generator | None = None,
        batch_size: int | None = None,
        num_inference_steps: int = 50,
        scheduler: str = "ddim",
        conditioning_scale: float = 1.0,
        dtype: str | torch.dtype | None = None,
        progress: bool = True,
    ) -> DuoSample:
        """Generate ``num_samples`` paired (image, label) volumes.

        Args:
            num_samples: how many pairs.
            seed: sample ``i`` uses seed ``seed + i`` (or pass one seed per sample). A sample depends only
                on its seed: it is identical alone or in a batch.
            generator: alternative to ``seed``: per-sample seeds are drawn from it.
            batch_size: samples per forward pass (default: all at once).
            num_inference_steps: denoising steps per stage (``<= num_train_timesteps``).
            scheduler: ``"ddim"`` (default), ``"ddpm"`` or ``"pndm"``.
            conditioning_scale: ControlNet residual multiplier in stage 2.
            dtype: autocast dtype: ``None``/``"float32"`` (exact), ``"bfloat16"`` (fast on CPU),
                ``"float16"`` (CUDA).
            progress: show tqdm bars.

        Returns:
            :class:`DuoSample` with float32 images ``(N, C, H, W, D)`` in [0, 1] and int64 labels
            ``(N, 1, H, W, D)``.
        """
        seeds = self._resolve_seeds(num_samples, seed, generator)
        bs = self._batch_size(num_samples, batch_size)
        sched, amp = self._prepare(scheduler, num_inference_steps, conditioning_scale, dtype)
        stochastic = is_stochastic(scheduler)
        images, labels = [], []
        for start in range(0, num_samples, bs):
            chunk = seeds[start : start + bs]
            lab = self._generate_labels(chunk, sched, stochastic, amp, progress)
            img = self._generate_images(lab, chunk, sched, stochastic, conditioning_scale, amp, progress)
            labels.append(lab)
            images.append(img)
        return self._result(images, labels, seeds)

    @torch.inference_mode()
    def generate_images(
        self,
        labels: torch.Tensor | np.ndarray,
        *,
        seed: int | Sequence[int] | None = None,
        generator: torch.Generator | None = None,
        batch_size: int | None = None,
        num_inference_steps: int = 50,
        scheduler: str = "ddim",
        conditioning_scale: float = 1.0,
        dtype: str | torch.dtype | None = None,
        progress: bool = True,
    ) -> DuoSample:
        """Run stage 2 alone: generate images for your own label maps.

        Args:
            labels: integer ``(N, 1, H, W, D)`` or ``(N, H, W, D)`` class ids in ``range(num_classes)``
                with ``(H, W, D) == config.volume_shape``.
            Other arguments as in :meth:`sample`.

        Returns:
            :class:`DuoSample` whose ``labels`` are the given ones (int64).
        """
        lab = self.validate_labels(labels)
        n = int(lab.shape[0])
        seeds = self._resolve_seeds(n, seed, generator)
        bs = self._batch_size(n, batch_size)
        sched, amp = self._prepare(scheduler, num_inference_steps, conditioning_scale, dtype)
        stochastic = is_stochastic(scheduler)
        images, labels_out = [], []
        for start in range(0, n, bs):
            chunk = lab[start : start + bs]
            images.append(self._generate_images(chunk, seeds[start : start + bs], sched, stochastic,
                                                conditioning_scale, amp, progress))
            labels_out.append(chunk)
        return self._result(images, labels_out, seeds)

"""`DuoDiffusion`: a label LDM and a ControlNet-conditioned image LDM that sample paired volumes.

Stage 1 denoises a label latent and decodes it into a segmentation map; stage 2 denoises an image
latent with a ControlNet that sees the one-hot label map at image resolution (the FOSCU design).
"""

from __future__ import annotations

import functools
import logging
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import keys
from .attributes import (
    attribute_names,
    make_context,
    requested_attributes,
    standardise,
    warn_outside_training_range,
)
from .config import PipelineConfig
from .control import qc_accepts, retry_seed, summarise, volumes_within_tolerance
from .decoding import TileSize, check_tile_size, decode, describe_decode
from .dtypes import autocast, autocast_dtype, is_dtype_name, resolve_dtype
from .hub import HubMixin
from .io import NonFiniteError, spacing_affine
from .models import build_component
from .output import DuoSample
from .precision import choose_dtype, is_auto
from .presets import make_config
from .sampling import denoise, initial_noise, is_stochastic, stage_generators
from .schedulers import Sampler, check_num_inference_steps, check_scheduler_name, make_scheduler

__all__ = ["DuoDiffusion", "resolve_dtype"]  # resolve_dtype: from duodiff.dtypes, re-exported for older code

logger = logging.getLogger(__name__)

class DuoDiffusion(HubMixin):
    """Generates paired (image, label) volumes with two latent diffusion models.

    Components (MONAI networks): ``label_autoencoder``, ``label_unet``, ``image_autoencoder``,
    ``image_unet``, ``image_controlnet``; the noise schedule and volume metadata live in ``config``.
    ``from_pretrained``, ``save_pretrained`` and ``push_to_hub`` come from :class:`~duodiff.hub.HubMixin`, which
    saves ``config`` and ``components()`` and rebuilds the pipeline with ``DuoDiffusion(config, components)``.

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
        image_prediction_type: str | None = None,
        attributes: Sequence[str] = (),
        init_seed: int | None = 0,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> DuoDiffusion:
        """An untrained pipeline of a named architecture (``"tiny"``, ``"hippocampus"``, ``"paper"``).

        See :func:`duodiff.presets.make_config` for the arguments.
        """
        cfg = make_config(
            name, num_classes=num_classes, volume_shape=volume_shape, spacing=spacing, label_names=label_names,
            image_channels=image_channels, prediction_type=prediction_type,
            image_prediction_type=image_prediction_type, attributes=attributes, overrides=overrides,
        )
        return cls.from_config(cfg, init_seed=init_seed)

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
        """Move (and optionally cast) every network in place; returns ``self``.

        Like diffusers' ``DiffusionPipeline.to``, a dtype may come first: ``pipe.to(torch.float16)`` or
        ``pipe.to("bfloat16")`` cast without moving.
        """
        if dtype is None and (isinstance(device, torch.dtype) or is_dtype_name(device)):
            device, dtype = None, device
        dt = resolve_dtype(dtype)
        for m in self.modules():
            m.to(device=device, dtype=dt)
        return self

    def compile(self, **kwargs: Any) -> DuoDiffusion:
        """``torch.compile`` the three denoising networks in place (``nn.Module.compile``); returns ``self``.

        The networks run at every denoising step, so they are where compilation pays; the autoencoders run
        once per sample and are left alone. State-dict keys do not change, so ``save_pretrained`` still writes
        plain weights. ``kwargs`` go to :func:`torch.compile` (e.g. ``mode="max-autotune"``, ``dynamic=False``).
        The first call for each input shape / dtype compiles (minutes on a CPU); the measured effect is in
        ``docs/performance.md``.
        """
        for name in ("label_unet", "image_unet", "image_controlnet"):
            getattr(self, name).compile(**kwargs)
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
    def one_hot(self, labels: torch.Tensor) -> torch.Tensor:
        """int64 ``(N, 1, H, W, D)`` ids -> float32 ``(N, K, H, W, D)`` one-hot (background included)."""
        oh = F.one_hot(labels[:, 0].long(), self.config.num_classes)  # (N, H, W, D, K)
        return oh.movedim(-1, 1).float()

    def _decode(self, kind: str, latents: torch.Tensor, tile: TileSize, seeds: Sequence[int] | None = None
                ) -> torch.Tensor:
        """Decode ``kind`` ("label"/"image") latents; raise :class:`NonFiniteError` on NaN/Inf output."""
        ae = getattr(self, f"{kind}_autoencoder")
        out = decode(ae, latents / getattr(self.config, f"{kind}_scale_factor"), tile_size=tile)
        finite = torch.isfinite(out).flatten(1).all(1)
        if not bool(finite.all()):
            dtype = autocast_dtype(self.device.type) or self.dtype
            bad = torch.nonzero(~finite).flatten().tolist()
            which = f"seeds {[int(seeds[i]) for i in bad]}" if seeds is not None else f"samples {bad}"
            if dtype == torch.float16:
                hint = ("float16 overflows beyond 65504 (a known failure of latent-diffusion decoders). Sample with "
                        "dtype='bfloat16' (float32's range, fast on recent CPUs/GPUs) or dtype=None (float32).")
            elif dtype == torch.bfloat16:
                hint = "Sample with dtype=None (float32); if that fails too, the model's weights are broken."
            else:
                hint = "The model's weights or latents are broken (NaN/Inf in the checkpoint?); check the model."
            raise NonFiniteError(
                f"The {kind} autoencoder decoded NaN/Inf values for {len(bad)} of {len(finite)} sample(s) ({which}) "
                f"with dtype={str(dtype).removeprefix('torch.')}; duodiff does not return or save such volumes. "
                f"{hint}"
            )
        return out

    @torch.inference_mode()
    def decode_labels(self, latents: torch.Tensor, *, decode_tile_size: TileSize = "auto") -> torch.Tensor:
        """Scaled label latents ``(N, C, h, w, d)`` -> int64 label ids ``(N, 1, H, W, D)``.

        ``decode_tile_size``: see :func:`duodiff.decoding.decode` (``"auto"`` decodes whole volumes, exactly,
        whatever the free memory). Raises :class:`~duodiff.io.NonFiniteError` if the logits hold NaN/Inf.
        """
        return self._decode("label", latents, decode_tile_size).argmax(dim=1, keepdim=True)

    @torch.inference_mode()
    def decode_images(self, latents: torch.Tensor, *, decode_tile_size: TileSize = "auto") -> torch.Tensor:
        """Scaled image latents ``(N, C, h, w, d)`` -> float32 images ``(N, C_img, H, W, D)`` clamped to [0, 1].

        ``decode_tile_size``: as in :meth:`decode_labels`. Raises :class:`~duodiff.io.NonFiniteError` if the
        decoder output holds NaN/Inf (checked before clamping, which would hide Inf).
        """
        return self._decode("image", latents, decode_tile_size).clamp_(0.0, 1.0)

    def _batched(self, n: int, batch_size: int, fn: Any) -> list:
        """``[fn(start, stop) for each batch]``; on CUDA OOM the batch is retried at half size (logged)."""
        results, start = [], 0
        while start < n:
            stop = min(start + batch_size, n)
            try:
                results.append(fn(start, stop))
            except torch.cuda.OutOfMemoryError:
                if stop - start == 1:
                    raise
                batch_size = (stop - start) // 2
                logger.warning("CUDA out of memory with a batch of %d; retrying with batches of %d",
                               stop - start, batch_size)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            start = stop
        return results

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
    def _prepare(self, scheduler: str, num_inference_steps: int, conditioning_scale: float, dtype: Any
                 ) -> tuple[Callable[[str], Sampler], torch.dtype | None]:
        """Check the sampling arguments; return ``(new_scheduler, autocast dtype)``.

        ``new_scheduler(kind)`` makes a fresh sampler for the ``"label"`` or ``"image"`` stage's training schedule
        with its timesteps set: multistep samplers (PNDM, DPM-Solver++, UniPC) keep the previous steps' outputs,
        so every denoising run (each stage, batch and retry) gets its own.
        """
        for kind in ("label", "image"):
            check_num_inference_steps(num_inference_steps, self.config.schedule_of(kind))
        check_scheduler_name(scheduler)
        if not isinstance(conditioning_scale, (int, float)) or isinstance(conditioning_scale, bool):
            raise TypeError(f"conditioning_scale must be a number, got {conditioning_scale!r}.")
        weights = self.dtype
        if is_auto(dtype):
            # measured once per (device, CPU/GPU model, threads, model) and cached; low-precision weights: theirs
            amp = choose_dtype(self, num_inference_steps)
        else:
            amp = resolve_dtype(dtype)
        if weights != torch.float32:
            # low-precision weights (``to(dtype=...)`` / ``from_pretrained(dtype=...)``) need autocast to match
            if amp is None:
                amp = weights
            elif amp != weights:
                raise ValueError(
                    f"dtype={dtype!r} does not match the pipeline's {weights} weights. Pass dtype=None (autocast to "
                    f"{weights}) or cast the weights first with pipe.to(dtype=...)."
                )
        new_scheduler = functools.partial(self._new_scheduler, scheduler, num_inference_steps)
        for kind in ("label", "image"):
            new_scheduler(kind)  # fail here, before any work: e.g. 'dpmsolver++' without diffusers installed
        return new_scheduler, amp

    def _new_scheduler(self, scheduler: str, num_inference_steps: int, kind: str) -> Sampler:
        sched = make_scheduler(scheduler, self.config.schedule_of(kind))
        sched.set_timesteps(num_inference_steps, device=self.device)
        return sched

    def check_class_volumes(
        self,
        class_volumes: Mapping[str | int, float] | Sequence[Mapping[str | int, float]] | None,
        num_samples: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate a ``class_volumes`` request (mL) as :meth:`sample` does; returns the raw ``(values, mask)``.

        Raises ``ValueError`` for unknown classes, non-positive volumes and volumes above the field of view
        (``volume_shape`` x ``spacing``, in mL); warns (:class:`~duodiff.attributes.OutOfTrainingRangeWarning`)
        for volumes far outside the training statistics the model records, giving the range in mL.
        """
        c = self.config
        values, mask = requested_attributes(class_volumes, num_samples, attributes=c.attributes,
                                            label_names=c.label_names, spacing=c.spacing,
                                            volume_shape=c.volume_shape)
        if class_volumes is not None:
            warn_outside_training_range(values, mask, attributes=c.attributes, label_names=c.label_names,
                                        spacing=c.spacing, mean=c.attribute_mean, std=c.attribute_std,
                                        stacklevel=3)
        return values, mask

    def _attribute_context(self, class_volumes, n: int):
        """``(values, mask, context, null_context)`` of a ``class_volumes`` request (contexts None if unconditioned)."""
        c = self.config
        values, mask = self.check_class_volumes(class_volumes, n)
        if not c.attributes:
            return values, mask, None, None
        dim = c.label_unet.cross_attention_dim
        context = make_context(standardise(values, c.attribute_mean, c.attribute_std), mask, dim)
        null_context = make_context(torch.zeros_like(values), torch.zeros_like(mask), dim)
        return values, mask, context, null_context

    def _generate_labels(self, seeds, new_scheduler, stochastic, amp, progress, tile="auto", context=None,
                         null_context=None, guidance_scale=1.0) -> torch.Tensor:
        gens = stage_generators(seeds, "label")
        noise = initial_noise(gens, self.config.label_latent_shape, self.device)
        if context is not None:
            context = context.to(self.device)
            null_context = null_context.to(self.device)
        with autocast(self.device.type, amp):
            z = denoise(self.label_unet, new_scheduler("label"), noise, generators=gens, stochastic=stochastic,
                        progress=progress, desc="labels", context=context, null_context=null_context,
                        guidance_scale=guidance_scale)
            return self._decode("label", z, tile, seeds).argmax(dim=1, keepdim=True)

    def _generate_images(self, labels, seeds, new_scheduler, stochastic, conditioning_scale, amp, progress,
                         tile="auto") -> torch.Tensor:
        gens = stage_generators(seeds, "image")
        noise = initial_noise(gens, self.config.image_latent_shape, self.device)
        with autocast(self.device.type, amp):
            z = denoise(self.image_unet, new_scheduler("image"), noise, generators=gens, stochastic=stochastic,
                        controlnet=self.image_controlnet, condition=self.one_hot(labels),
                        conditioning_scale=conditioning_scale, progress=progress, desc="images")
            return self._decode("image", z, tile, seeds).clamp_(0.0, 1.0)

    def _result(self, images: list[torch.Tensor], labels: list[torch.Tensor], seeds: list[int], tile: TileSize,
                stages: Sequence[str] = ("label", "image")) -> DuoSample:
        c = self.config
        paths = {
            kind: describe_decode(getattr(self, f"{kind}_autoencoder"),
                                  (1, *getattr(c, f"{kind}_latent_shape")), tile)
            for kind in stages
        }
        return DuoSample(
            images=torch.cat(images).cpu(), labels=torch.cat(labels).cpu(), affine=self.affine,
            spacing=c.spacing, label_names=c.label_names, seeds=seeds, decode=paths,
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
        dtype: str | torch.dtype | None = "auto",
        decode_tile_size: TileSize = "auto",
        class_volumes: Mapping[str | int, float] | Sequence[Mapping[str | int, float]] | None = None,
        guidance_scale: float = 1.0,
        volume_tolerance: float | None = None,
        qc: nn.Module | None = None,
        qc_threshold: float = 0.5,
        max_retries: int = 3,
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
            scheduler: ``"ddim"`` (default), ``"ddpm"``, ``"pndm"``, or the few-step solvers ``"dpmsolver++"``
                (DPM-Solver++ 2M) and ``"unipc"`` (UniPC), which need diffusers (``pip install
                "duodiff[samplers]"``). All are built from the model's training schedule (:mod:`duodiff.schedulers`).
            conditioning_scale: ControlNet residual multiplier in stage 2.
            dtype: autocast dtype: ``"auto"`` (default: the fastest dtype whose outputs match float32 within
                :data:`duodiff.precision.TOLERANCE`, measured on the first call for this model, device and
                processor and cached; see :mod:`duodiff.precision`), ``None``/``"float32"`` (exact),
                ``"bfloat16"``, ``"float16"`` (CUDA). Pass an explicit dtype when outputs must be identical
                across machines.
            decode_tile_size: VAE decoding: ``"auto"`` (default: whole volumes one by one, exact, never
                dependent on free memory; a volume that does not fit raises
                :class:`~duodiff.decoding.DecodeMemoryError` suggesting tiles), ``None`` (whole batch in one
                call), or latent tiles of an int or ``(h, w, d)`` voxels (approximate). The path taken is
                recorded in ``DuoSample.decode``. See :mod:`duodiff.decoding`. A CUDA out-of-memory error while
                denoising retries the batch at half size.
            class_volumes: requested foreground volumes in **mL**, ``{class name or id: mL}`` for all samples
                or one mapping per sample; classes left out are unconditioned. Needs a model trained with
                ``attributes=["volume"]`` (see :mod:`duodiff.attributes`). A volume above the field of view is
                a ``ValueError``; one far outside the training range warns (:meth:`check_class_volumes`).
            guidance_scale: classifier-free guidance weight of the label stage (``1`` = plain conditional).
            volume_tolerance: with ``class_volumes``, regenerate samples (new seeds) whose measured volumes are
                not within this relative tolerance (e.g. ``0.15``) of the request — rejection sampling.
            qc: pair-consistency check: a segmenter mapping images ``(N, C, H, W, D)`` to class logits
                ``(N, K, H, W, D)``; pairs whose mean foreground Dice(qc(image), label) < ``qc_threshold``
                are regenerated with new seeds.
            qc_threshold: Dice threshold of ``qc``.
            max_retries: regeneration rounds for rejected samples; samples still failing are kept and listed
                in ``report["failed_seeds"]``.
            progress: show tqdm bars.

        Returns:
            :class:`DuoSample` with float32 images ``(N, C, H, W, D)`` in [0, 1] and int64 labels
            ``(N, 1, H, W, D)``. ``seeds[i]`` is the seed that produced sample ``i`` (a retry seed if it was
            regenerated); ``report`` holds acceptance statistics when constraints or QC were used; ``decode``
            records each stage's decode path.

        Raises:
            NonFiniteError: a decoded volume holds NaN/Inf (e.g. a float16 overflow); the message names the
                dtype and the fix.
            ImportError: ``scheduler="dpmsolver++"`` / ``"unipc"`` without diffusers; the message says what to
                install.
        """
        seeds = self._resolve_seeds(num_samples, seed, generator)
        bs = self._batch_size(num_samples, batch_size)
        new_scheduler, amp = self._prepare(scheduler, num_inference_steps, conditioning_scale, dtype)
        stochastic = is_stochastic(scheduler)
        check_tile_size(decode_tile_size)
        c = self.config
        values, mask, context, null_context = self._attribute_context(class_volumes, num_samples)
        if not isinstance(guidance_scale, (int, float)) or isinstance(guidance_scale, bool) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a number >= 0, got {guidance_scale!r}.")
        if volume_tolerance is not None and (class_volumes is None or not volume_tolerance > 0):
            raise ValueError(f"volume_tolerance needs class_volumes and a value > 0, got {volume_tolerance!r}.")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an int >= 0, got {max_retries!r}.")
        if qc is not None and not callable(qc):
            raise TypeError(f"qc must be a torch module (a segmenter), got {type(qc).__name__}.")
        volume_cols = [i for i, n in enumerate(attribute_names(c.attributes, c.label_names)) if n.startswith("volume:")]
        stats = {"attempts": 0, "volume": 0, "qc": 0, "failed": [], "dice": [None] * num_samples}
        constrained = volume_tolerance is not None or qc is not None

        def labels_for(chunk_seeds, idx):
            ctx = None if context is None else context[idx]
            nctx = None if null_context is None else null_context[idx]
            stats["attempts"] += len(idx)
            return self._generate_labels(chunk_seeds, new_scheduler, stochastic, amp, progress, decode_tile_size, ctx,
                                         nctx, guidance_scale)

        def checked_labels(idx: list[int]) -> torch.Tensor:
            # 1. labels, regenerating those whose measured volumes miss the request (rejection sampling)
            lab = labels_for([seeds[i] for i in idx], idx)
            for attempt in range(1, max_retries + 2):
                if volume_tolerance is None:
                    break
                ok = volumes_within_tolerance(lab, values[idx][:, volume_cols], mask[idx][:, volume_cols],
                                              volume_tolerance, c.num_classes)
                bad = [j for j in range(len(idx)) if not ok[j]]
                stats["volume"] += len(bad)
                if not bad or attempt > max_retries:
                    stats["failed"] += [seeds[idx[j]] for j in bad]
                    break
                for j in bad:
                    seeds[idx[j]] = retry_seed(seeds[idx[j]], attempt)
                lab = lab.clone()
                lab[bad] = labels_for([seeds[idx[j]] for j in bad], [idx[j] for j in bad])
            return lab

        def pairs(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
            idx = list(range(start, stop))
            lab = checked_labels(idx)
            # 2. images for the labels
            img = self._generate_images(lab, [seeds[i] for i in idx], new_scheduler, stochastic, conditioning_scale,
                                        amp, progress, decode_tile_size)
            # 3. pair-consistency QC: regenerate pairs whose image does not show its label
            for attempt in range(1, max_retries + 2):
                if qc is None:
                    break
                ok, dice = qc_accepts(qc, img, lab, c.num_classes, qc_threshold)
                for j, i in enumerate(idx):
                    stats["dice"][i] = float(dice[j])
                bad = [j for j in range(len(idx)) if not ok[j]]
                stats["qc"] += len(bad)
                if not bad or attempt > max_retries:
                    stats["failed"] += [seeds[idx[j]] for j in bad]
                    break
                for j in bad:
                    seeds[idx[j]] = retry_seed(seeds[idx[j]], 100 + attempt)
                sub = [idx[j] for j in bad]
                new_lab = checked_labels(sub)
                new_img = self._generate_images(new_lab, [seeds[i] for i in sub], new_scheduler, stochastic,
                                                conditioning_scale, amp, progress, decode_tile_size)
                lab, img = lab.clone(), img.clone()
                lab[bad], img[bad] = new_lab, new_img
            return img, lab

        images, labels = zip(*self._batched(num_samples, bs, pairs))
        result = self._result(list(images), list(labels), seeds, decode_tile_size)
        if constrained:
            result.report = summarise(num_samples, stats["attempts"], stats["volume"], stats["qc"], stats["failed"],
                                      stats["dice"] if qc is not None else None)
        return result

    @torch.inference_mode()
    def sample_labels(
        self,
        num_samples: int,
        *,
        seed: int | Sequence[int] | None = None,
        generator: torch.Generator | None = None,
        batch_size: int | None = None,
        num_inference_steps: int = 50,
        scheduler: str = "ddim",
        dtype: str | torch.dtype | None = "auto",
        class_volumes: Mapping[str | int, float] | Sequence[Mapping[str | int, float]] | None = None,
        guidance_scale: float = 1.0,
        progress: bool = True,
    ) -> torch.Tensor:
        """Run stage 1 alone: label maps only (e.g. to study controllability cheaply).

        Sample ``i`` equals ``sample(...).labels[i]`` for the same seed and arguments.

        Returns:
            int64 ``(N, 1, H, W, D)`` class ids (CPU).
        """
        seeds = self._resolve_seeds(num_samples, seed, generator)
        bs = self._batch_size(num_samples, batch_size)
        new_scheduler, amp = self._prepare(scheduler, num_inference_steps, 1.0, dtype)
        _, _, context, null_context = self._attribute_context(class_volumes, num_samples)
        out = []
        for start in range(0, num_samples, bs):
            sl = slice(start, start + bs)
            out.append(self._generate_labels(seeds[sl], new_scheduler, is_stochastic(scheduler), amp, progress,
                                             "auto",
                                             None if context is None else context[sl],
                                             None if null_context is None else null_context[sl],
                                             guidance_scale).cpu())
        return torch.cat(out)

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
        dtype: str | torch.dtype | None = "auto",
        decode_tile_size: TileSize = "auto",
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
        new_scheduler, amp = self._prepare(scheduler, num_inference_steps, conditioning_scale, dtype)
        stochastic = is_stochastic(scheduler)
        check_tile_size(decode_tile_size)

        def images(start: int, stop: int) -> torch.Tensor:
            return self._generate_images(lab[start:stop], seeds[start:stop], new_scheduler, stochastic,
                                         conditioning_scale, amp, progress, decode_tile_size)

        return self._result(self._batched(n, bs, images), [lab], seeds, decode_tile_size, stages=("image",))

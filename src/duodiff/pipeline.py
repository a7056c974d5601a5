"""`DuoDiffusion`: a label LDM and a ControlNet-conditioned image LDM that sample paired volumes.

Stage 1 denoises a label latent and decodes it into a segmentation map; stage 2 denoises an image
latent with a ControlNet that sees the one-hot label map at image resolution (the FOSCU design).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import keys
from .attributes import class_volume_request
from .config import PipelineConfig
from .control import RejectionSampler
from .decoding import TileSize
from .dtypes import is_dtype_name, resolve_dtype
from .hub import HubMixin
from .io import spacing_affine
from .models import build_component
from .output import DuoSample
from .presets import make_config
from .sample_stages import collect_pairs, decode_checked, generate_images, generate_labels, run_in_batches
from .sampling_options import ClassVolumes, SamplingOptions, SamplingPlan, check_label_maps, make_plan
from .schedulers import DEFAULT_NUM_INFERENCE_STEPS, DEFAULT_SCHEDULER

__all__ = ["DuoDiffusion", "resolve_dtype"]  # resolve_dtype: from duodiff.dtypes, re-exported for older code

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
        missing, extra = keys.component_mismatch(components)
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

    @torch.inference_mode()
    def decode_labels(self, latents: torch.Tensor, *, decode_tile_size: TileSize = "auto") -> torch.Tensor:
        """Scaled label latents ``(N, C, h, w, d)`` -> int64 label ids ``(N, 1, H, W, D)``.

        ``decode_tile_size``: see :func:`duodiff.decoding.decode` (``"auto"`` decodes whole volumes, exactly,
        whatever the free memory). Raises :class:`~duodiff.io.NonFiniteError` if the logits hold NaN/Inf.
        """
        return decode_checked(self, "label", latents, decode_tile_size).argmax(dim=1, keepdim=True)

    @torch.inference_mode()
    def decode_images(self, latents: torch.Tensor, *, decode_tile_size: TileSize = "auto") -> torch.Tensor:
        """Scaled image latents ``(N, C, h, w, d)`` -> float32 images ``(N, C_img, H, W, D)`` clamped to [0, 1].

        ``decode_tile_size``: as in :meth:`decode_labels`. Raises :class:`~duodiff.io.NonFiniteError` if the
        decoder output holds NaN/Inf (checked before clamping, which would hide Inf).
        """
        return decode_checked(self, "image", latents, decode_tile_size).clamp_(0.0, 1.0)

    def validate_labels(self, labels: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Check user label maps and return int64 ``(N, 1, H, W, D)`` on the pipeline's device.

        Accepts ``(N, 1, H, W, D)`` or ``(N, H, W, D)`` integer arrays with ids in ``range(num_classes)``
        and ``(H, W, D) == config.volume_shape``.
        """
        return check_label_maps(labels, self.config.volume_shape, self.config.label_names).to(self.device)

    # ------------------------------------------------------------------ sampling
    def check_class_volumes(self, class_volumes: ClassVolumes | None, num_samples: int = 1
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate a ``class_volumes`` request (mL) as :meth:`sample` does; returns the raw ``(values, mask)``.

        Raises ``ValueError`` for unknown classes, non-positive volumes and volumes above the field of view
        (``volume_shape`` x ``spacing``, in mL); warns (:class:`~duodiff.attributes.OutOfTrainingRangeWarning`)
        for volumes far outside the training statistics the model records, giving the range in mL.
        """
        return class_volume_request(self.config, class_volumes, num_samples)

    def _generate_labels(self, seeds: Sequence[int], plan: SamplingPlan, context: torch.Tensor | None = None,
                         null_context: torch.Tensor | None = None) -> torch.Tensor:
        """Stage 1 for ``seeds`` (:func:`duodiff.sample_stages.generate_labels`)."""
        return generate_labels(self, seeds, plan, context, null_context)

    def _generate_images(self, labels: torch.Tensor, seeds: Sequence[int], plan: SamplingPlan) -> torch.Tensor:
        """Stage 2 for ``labels`` (:func:`duodiff.sample_stages.generate_images`)."""
        return generate_images(self, labels, seeds, plan)

    def _result(self, images: list[torch.Tensor], labels: list[torch.Tensor], seeds: list[int], tile: TileSize,
                stages: Sequence[str] = ("label", "image")) -> DuoSample:
        return collect_pairs(self, images, labels, seeds, tile, stages)

    @torch.inference_mode()
    def sample(
        self,
        num_samples: int,
        *,
        seed: int | Sequence[int] | None = None,
        generator: torch.Generator | None = None,
        batch_size: int | None = None,
        num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
        scheduler: str | None = DEFAULT_SCHEDULER,
        conditioning_scale: float = 1.0,
        dtype: str | torch.dtype | None = "auto",
        decode_tile_size: TileSize = "auto",
        class_volumes: ClassVolumes | None = None,
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
            num_inference_steps: denoising steps per stage (``<= num_train_timesteps``; default
                :data:`~duodiff.schedulers.DEFAULT_NUM_INFERENCE_STEPS` = 20: on the bundled model DDIM meets
                the quality of DDIM-50 from 10 steps on, docs/performance.md).
            scheduler: ``None`` (default: each stage's own, ``"ddim"``, or ``"rflow"`` for a stage trained with
                rectified flow), ``"ddim"``, ``"ddpm"``, ``"pndm"``, the few-step solvers ``"dpmsolver++"``
                (DPM-Solver++ 2M) and ``"unipc"`` (UniPC), which need diffusers (``pip install
                "duodiff[samplers]"``), or ``"rflow"``. All are built from the model's training schedule
                (:mod:`duodiff.schedulers`).
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
            TypeError, ValueError: an invalid option, named with its value and the fix, before anything is
                generated (:class:`~duodiff.sampling_options.SamplingOptions` lists the checks; ``sample_labels``
                and ``generate_images`` make the same ones).
            NonFiniteError: a decoded volume holds NaN/Inf (e.g. a float16 overflow); the message names the
                dtype and the fix.
            ImportError: ``scheduler="dpmsolver++"`` / ``"unipc"`` without diffusers; the message says what to
                install.
        """
        # 1. check every option, then against this model, before any work
        options = SamplingOptions(
            num_samples, seed=seed, generator=generator, batch_size=batch_size, num_inference_steps=num_inference_steps,
            scheduler=scheduler, conditioning_scale=conditioning_scale, dtype=dtype, decode_tile_size=decode_tile_size,
            class_volumes=class_volumes, guidance_scale=guidance_scale, volume_tolerance=volume_tolerance, qc=qc,
            qc_threshold=qc_threshold, max_retries=max_retries, progress=progress)
        plan = make_plan(self, options)
        # 2. labels, then images for them, batch by batch (halved on CUDA OOM); rejected samples get new seeds
        sampler = RejectionSampler(plan, lambda seeds, idx: self._generate_labels(seeds, plan, *plan.contexts(idx)),
                                   lambda labels, seeds: self._generate_images(labels, seeds, plan),
                                   self.config.num_classes)
        images, labels = zip(*run_in_batches(num_samples, options.batch, sampler.pairs))
        # 3. on the CPU, with the seed that made each sample and the acceptance report
        result = self._result(list(images), list(labels), sampler.seeds, decode_tile_size)
        if options.constrained:
            result.report = sampler.report()
        return result

    @torch.inference_mode()
    def sample_labels(
        self,
        num_samples: int,
        *,
        seed: int | Sequence[int] | None = None,
        generator: torch.Generator | None = None,
        batch_size: int | None = None,
        num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
        scheduler: str | None = DEFAULT_SCHEDULER,
        dtype: str | torch.dtype | None = "auto",
        class_volumes: ClassVolumes | None = None,
        guidance_scale: float = 1.0,
        progress: bool = True,
    ) -> torch.Tensor:
        """Run stage 1 alone: label maps only (e.g. to study controllability cheaply).

        Sample ``i`` equals ``sample(...).labels[i]`` for the same seed and arguments. The arguments are those of
        :meth:`sample` and are checked the same way (a CUDA out-of-memory error also halves the batch).

        Returns:
            int64 ``(N, 1, H, W, D)`` class ids in ``range(num_classes)`` (CPU).

        Raises:
            TypeError, ValueError: an invalid option, as in :meth:`sample`, before anything is generated.
            NonFiniteError: the label decoder produced NaN/Inf.
        """
        options = SamplingOptions(
            num_samples, seed=seed, generator=generator, batch_size=batch_size, num_inference_steps=num_inference_steps,
            scheduler=scheduler, dtype=dtype, class_volumes=class_volumes, guidance_scale=guidance_scale,
            progress=progress)
        plan = make_plan(self, options)

        def labels(start: int, stop: int) -> torch.Tensor:
            return self._generate_labels(options.seeds[start:stop], plan, *plan.contexts(slice(start, stop))).cpu()

        return torch.cat(run_in_batches(num_samples, options.batch, labels))

    @torch.inference_mode()
    def generate_images(
        self,
        labels: torch.Tensor | np.ndarray,
        *,
        seed: int | Sequence[int] | None = None,
        generator: torch.Generator | None = None,
        batch_size: int | None = None,
        num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
        scheduler: str | None = DEFAULT_SCHEDULER,
        conditioning_scale: float = 1.0,
        dtype: str | torch.dtype | None = "auto",
        decode_tile_size: TileSize = "auto",
        progress: bool = True,
    ) -> DuoSample:
        """Run stage 2 alone: generate images for your own label maps.

        Args:
            labels: integer ``(N, 1, H, W, D)`` or ``(N, H, W, D)`` class ids in ``range(num_classes)``
                with ``(H, W, D) == config.volume_shape``.
            Other arguments as in :meth:`sample`, checked the same way.

        Returns:
            :class:`DuoSample` with float32 images ``(N, C, H, W, D)`` in [0, 1] and the given labels as int64
            ``(N, 1, H, W, D)``; ``decode`` records the image stage's decode path.

        Raises:
            TypeError, ValueError: labels of a non-integer dtype, another shape, no map or ids outside
                ``range(num_classes)`` (:meth:`validate_labels`), or an invalid option as in :meth:`sample`;
                all before anything is generated.
            NonFiniteError: the image decoder produced NaN/Inf.
        """
        lab = self.validate_labels(labels)
        options = SamplingOptions(
            int(lab.shape[0]), seed=seed, generator=generator, batch_size=batch_size,
            num_inference_steps=num_inference_steps, scheduler=scheduler, conditioning_scale=conditioning_scale,
            dtype=dtype, decode_tile_size=decode_tile_size, progress=progress)
        plan = make_plan(self, options)
        seeds = list(options.seeds)

        def images(start: int, stop: int) -> torch.Tensor:
            return self._generate_images(lab[start:stop], seeds[start:stop], plan)

        images_ = run_in_batches(options.num_samples, options.batch, images)
        return self._result(images_, [lab], seeds, decode_tile_size, stages=("image",))

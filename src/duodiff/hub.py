"""Save / load / push pipelines as safetensors folders, locally or through the Hugging Face Hub.

:class:`HubMixin` gives a pipeline ``save_pretrained``, ``from_pretrained`` and ``push_to_hub``, in the style of
huggingface_hub's ``ModelHubMixin``: this module does all file and Hub I/O (the atomic folder write, variants,
strict safetensors loading, Hub downloads and uploads, the model card); the pipeline only says what it is made of.
The folder format and the strict loaders are in :mod:`duodiff.serialization`. This module never imports the
pipeline.

Weights are only ever read with ``safetensors`` and loaded strictly. Nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Self

import torch
from safetensors.torch import save_file
from torch import nn

from . import keys
from ._version import __version__
from .config import PipelineConfig
from .dtypes import resolve_dtype
from .io import chmod_as_new
from .models import build_component, count_parameters
from .serialization import (
    PIPELINE_CLASS_NAME,
    SCHEDULER_CONFIG,
    TRAINING_CASES,
    ModelLoadError,
    json_dump,
    load_state_dict_strict,
    load_state_strict,
    read_config,
    same_weights,
    weights_name,
)

__all__ = [
    "HubMixin",
    "save_pipeline",
    "load_pipeline",
    "push_pipeline",
    "weights_name",
    "resolve_model_path",
    "read_config",
    "load_state_dict_strict",
    "load_state_strict",
    "model_card",
    "ModelLoadError",
    "TRAINING_CASES",
]


class HubMixin:
    """``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` for a pipeline of named networks.

    The mixin does the I/O; a class using it says how to save and build itself:

    - ``config``: its :class:`~duodiff.config.PipelineConfig`, saved as ``model_index.json`` plus one
      ``config.json`` per component and the scheduler config; the networks are rebuilt from it on loading;
    - ``components()``: its networks by name (the names of :data:`duodiff.keys.COMPONENTS`), whose weights are
      saved as safetensors;
    - ``cls(config, components)``: builds it from a config and the loaded networks;
    - ``to(device=..., dtype=...)``: moves it (``from_pretrained(device=, dtype=)``).
    """

    config: PipelineConfig

    def components(self) -> dict[str, nn.Module]:  # pragma: no cover - provided by the class using the mixin
        raise NotImplementedError

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        *,
        revision: str | None = None,
        variant: str | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
    ) -> Self:
        """Load from a folder written by :meth:`save_pretrained` or a Hub repo id, strictly from safetensors.

        Args:
            path_or_repo_id: a local folder or a Hub repo id such as ``"org/duodiff-hippocampus"``.
            revision: Hub branch, tag or commit.
            variant: ``None`` (``model.safetensors``) or ``"fp16"`` (``model.fp16.safetensors``). A folder that
                holds only fp16 weights also loads with ``None`` (with a warning).
            dtype: cast the networks after loading (``"bfloat16"``, ``torch.float16``, ...; default float32).
            device: move the networks after loading.
            cache_dir: Hugging Face cache folder.
            local_files_only: never download; the model must be a folder or in the cache.
            token: Hugging Face token for private repos.

        Raises:
            FileNotFoundError: no such folder or repo, missing files, or offline without a cached copy.
            ModelLoadError: weights that are not valid safetensors, do not match the config, or hold NaN/Inf.
            ConfigError: a config that is not valid JSON or not a valid pipeline config.
        """
        folder = resolve_model_path(
            path_or_repo_id, revision=revision, variant=variant, cache_dir=cache_dir,
            local_files_only=local_files_only, token=token,
        )
        config = read_config(folder)
        fname = weights_name(variant)
        if variant is None and not any((folder / n / fname).is_file() for n in keys.COMPONENTS):
            # a folder that holds exactly one variant loads without naming it (a bundled or shared fp16-only model)
            if not Path(path_or_repo_id).expanduser().is_dir():  # a Hub snapshot: fetch the fp16 files instead
                folder = resolve_model_path(path_or_repo_id, revision=revision, variant="fp16", cache_dir=cache_dir,
                                            local_files_only=local_files_only, token=token)
            if all((folder / n / weights_name("fp16")).is_file() for n in keys.COMPONENTS):
                fname = weights_name("fp16")
                warnings.warn(
                    f"{str(path_or_repo_id)!r} holds only fp16 weights ({fname}); loaded them into float32 networks. "
                    "Pass variant='fp16' to say so and silence this warning.", UserWarning, stacklevel=2,
                )
        comps = {}
        for name in keys.COMPONENTS:
            module = build_component(name, config)
            load_state_dict_strict(module, folder / name / fname, component=name)
            comps[name] = module
        pipe = cls(config, comps)
        dt = resolve_dtype(dtype)
        if dt is not None or device is not None:
            pipe.to(device=device, dtype=dt)
        return pipe

    def save_pretrained(self, save_directory: str | os.PathLike, *, variant: str | None = None) -> None:
        """Write ``model_index.json`` + one folder per component (config + safetensors), atomically.

        See :func:`save_pipeline`, which also takes a model card and extra files.
        """
        save_pipeline(self, save_directory, variant=variant)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool = False,
        token: str | None = None,
        variant: str | None = None,
        commit_message: str = "Upload DuoDiffusion pipeline",
        license: str = "other",
    ) -> str:
        """Create ``repo_id`` if needed and upload the saved pipeline with a generated model card.

        Returns:
            The URL of the Hub commit.
        """
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "model"
            save_pipeline(self, folder, variant=variant, card=model_card(self, license=license))
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                                     repo_type="model")
        return str(getattr(info, "commit_url", info))


# ---------------------------------------------------------------------------------------- save
def save_pipeline(pipe: HubMixin, save_directory: str | os.PathLike, *, variant: str | None = None,
                  card: str | None = None, extra_files: Mapping[str, str] | None = None) -> Path:
    """Write ``pipe`` to ``save_directory`` atomically (what :meth:`HubMixin.save_pretrained` runs).

    Everything is written into a temporary sibling folder first and swapped in at the end, so a crash
    never leaves a half-written model where a good one was.

    Args:
        card: the ``README.md`` text (default :func:`model_card`).
        extra_files: text files written beside the components, by file name (e.g. :data:`TRAINING_CASES`).

    Raises:
        ValueError: an ``extra_files`` name that is a path or collides with the model's own files.
    """
    reserved = {*keys.COMPONENTS, keys.SCHEDULER, keys.MODEL_INDEX, "README.md"}
    for fname in extra_files or {}:
        if Path(fname).name != fname or fname in reserved or fname.startswith("."):
            raise ValueError(f"extra_files name {fname!r} must be a plain file name other than {sorted(reserved)}.")
    target = Path(save_directory)
    fname = weights_name(variant)
    cfg = pipe.config
    networks = pipe.components()
    parent = target.parent if str(target.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    except OSError as e:
        raise OSError(f"Cannot write a model to {str(target)!r}: {e}. Choose a writable folder.") from e
    try:
        index = {
            "_class_name": PIPELINE_CLASS_NAME,
            "_duodiff_version": __version__,
            "pipeline": {k: v for k, v in cfg.to_dict().items() if k not in keys.COMPONENTS},
            keys.SCHEDULER: ["duodiff", "SchedulerConfig"],
        }
        for name in keys.COMPONENTS:
            module = networks[name]
            index[name] = ["monai", type(module).__name__]
            sub = tmp / name
            sub.mkdir()
            (sub / keys.CONFIG_NAME).write_text(json_dump(getattr(cfg, name).to_dict()))
            state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
            if variant == "fp16":
                state = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}
            save_file(state, str(sub / fname), metadata={"format": "pt", "component": name})
        (tmp / keys.SCHEDULER).mkdir()
        (tmp / keys.SCHEDULER / SCHEDULER_CONFIG).write_text(json_dump(cfg.scheduler.to_dict()))
        (tmp / "README.md").write_text(card if card is not None else model_card(pipe))
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
        (tmp / keys.MODEL_INDEX).write_text(json_dump(index))
        chmod_as_new(tmp)  # mkdtemp's 0700 (and safetensors' 0600 files) would hide the model from other users
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _swap_in(tmp: Path, target: Path) -> None:
    """Replace ``target`` by ``tmp``; keeps other variants' weights in ``target`` if they hold the same model."""
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{str(target)!r} exists and is not a folder; choose another save_directory.")
    if target.exists():
        # keep weights of other variants that the new save does not write, but only if they hold the same
        # model (equal after fp16 rounding in every component); stale weights of another model are dropped
        written = {p.name for p in (tmp / keys.COMPONENTS[0]).glob("model*.safetensors")}
        others = {p.name for p in (target / keys.COMPONENTS[0]).glob("model*.safetensors")} - written
        for fname in sorted(others):
            pairs = [(target / name / fname, next((tmp / name).glob("model*.safetensors"))) for name in keys.COMPONENTS]
            if all(same_weights(old, new) for old, new in pairs):
                for old, new in pairs:
                    shutil.copy2(old, new.with_name(fname))
        backup = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, backup)
        try:
            os.replace(tmp, target)
        except BaseException:
            os.replace(backup, target)
            raise
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(tmp, target)


def model_card(pipe: HubMixin, *, license: str = "other", extra: str = "") -> str:
    """A Hub model card (YAML front matter + Markdown) describing ``pipe`` (its config and networks)."""
    c = pipe.config
    names = list(c.label_names)
    networks = pipe.components()
    lines = [
        "---",
        "library_name: duodiff",
        f"license: {license}",
        "tags:",
        "- duodiff",
        "- medical-imaging",
        "- diffusion",
        "- latent-diffusion",
        "- controlnet",
        "- 3d",
        "- segmentation",
        "- synthetic-data",
        "pipeline_tag: image-to-image",
        f"label_names: {json.dumps(names)}",
        f"volume_shape: {json.dumps(list(c.volume_shape))}",
        f"spacing_mm: {json.dumps(list(c.spacing))}",
        f"image_channels: {c.image_channels}",
        "---",
        "",
        "# Duo-Diffusion model",
        "",
        "Generates paired 3D (image, label) volumes with [duodiff](https://pypi.org/project/duodiff/): a label latent "
        "diffusion model, then a ControlNet-conditioned image latent diffusion model.",
        "",
        "```python",
        "from duodiff import DuoDiffusion",
        'pipe = DuoDiffusion.from_pretrained("<this repo or folder>")',
        "out = pipe.sample(4, seed=0)  # out.images (N, C, H, W, D) in [0, 1], out.labels (N, 1, H, W, D)",
        "```",
        "",
        "| property | value |",
        "|---|---|",
        f"| volume shape (voxels) | {tuple(c.volume_shape)} |",
        f"| spacing (mm) | {tuple(c.spacing)} |",
        f"| labels | {', '.join(f'{i}: {n}' for i, n in enumerate(names))} |",
        f"| image channels | {c.image_channels} |",
        f"| prediction type | {c.scheduler.prediction_type}"
        + (f" (label); {c.image_scheduler.prediction_type} (image)" if c.image_scheduler else "") + " |",
    ]
    for name in keys.COMPONENTS:
        lines.append(f"| {name} parameters | {count_parameters(networks[name]):,} |")
    if extra:
        lines += ["", extra]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- load
def _allow_patterns(variant: str | None) -> list[str]:
    fname = weights_name(variant)
    return [keys.MODEL_INDEX, "README.md", TRAINING_CASES, f"{keys.SCHEDULER}/*"] + [
        p for name in keys.COMPONENTS for p in (f"{name}/{keys.CONFIG_NAME}", f"{name}/{fname}")
    ]


def resolve_model_path(
    path_or_repo_id: str | os.PathLike,
    *,
    revision: str | None = None,
    variant: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> Path:
    """A local folder for ``path_or_repo_id``: the folder itself, or a Hub snapshot (only the needed files)."""
    if not isinstance(path_or_repo_id, (str, os.PathLike)):
        raise TypeError(f"path_or_repo_id must be a path or a Hub repo id, got {type(path_or_repo_id).__name__}.")
    weights_name(variant)  # validate early
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_repo_id)
    looks_like_repo = text.count("/") == 1 and not text.startswith((".", "/", "~")) and not path.exists()
    if not looks_like_repo:
        raise FileNotFoundError(
            f"No model folder at {text!r}. Pass a folder written by DuoDiffusion.save_pretrained() or a Hub repo "
            "id such as 'org/duodiff-hippocampus'."
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        local = snapshot_download(
            repo_id=text, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token,
            allow_patterns=_allow_patterns(variant),
        )
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(
            f"Model {text!r} (revision {revision or 'main'}) is not in the local Hugging Face cache "
            f"({cache_dir or 'default cache'}) and cannot be downloaded (offline or local_files_only=True). "
            "Download it once while online, or pass a local folder."
        ) from e
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise FileNotFoundError(f"Hub repo {text!r} (revision {revision or 'main'}) was not found: {e}") from e
    except HFValidationError as e:
        raise ValueError(f"{text!r} is neither a local folder nor a valid Hub repo id: {e}") from e
    return Path(local)


# ---------------------------------------------------------------------------------------- functional forms
def load_pipeline(cls: type[HubMixin], path_or_repo_id: str | os.PathLike, **kwargs) -> HubMixin:
    """``cls.from_pretrained(path_or_repo_id, **kwargs)`` (kept for code written before :class:`HubMixin`)."""
    return cls.from_pretrained(path_or_repo_id, **kwargs)


def push_pipeline(pipe: HubMixin, repo_id: str, **kwargs) -> str:
    """``pipe.push_to_hub(repo_id, **kwargs)`` (kept for code written before :class:`HubMixin`)."""
    return pipe.push_to_hub(repo_id, **kwargs)

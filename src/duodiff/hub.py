"""Save / load pipelines as safetensors folders, locally or through the Hugging Face Hub.

Layout (diffusers-like)::

    model_index.json                 pipeline class, version, PipelineConfig metadata
    label_autoencoder/config.json    component config
    label_autoencoder/model.safetensors   (or model.fp16.safetensors)
    ... one folder per component ...
    scheduler/scheduler_config.json
    README.md                        model card

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
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__, keys
from .config import ConfigError, PipelineConfig
from .io import chmod_as_new

if TYPE_CHECKING:  # pragma: no cover
    from .pipeline import DuoDiffusion

__all__ = [
    "save_pipeline",
    "load_pipeline",
    "push_pipeline",
    "weights_name",
    "resolve_model_path",
    "load_state_dict_strict",
    "load_state_strict",
    "model_card",
    "ModelLoadError",
]

_VARIANTS = (None, "fp16")
_SCHEDULER_CONFIG = "scheduler_config.json"


class ModelLoadError(ValueError):
    """A model folder is present but broken (corrupt weights, weights not matching the config, ...)."""


def weights_name(variant: str | None = None) -> str:
    """``model.safetensors`` or ``model.<variant>.safetensors``."""
    if variant not in _VARIANTS:
        raise ValueError(f"variant must be one of {list(_VARIANTS)}, got {variant!r}.")
    return "model.safetensors" if variant is None else f"model.{variant}.safetensors"


def _json_dump(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


# ---------------------------------------------------------------------------------------- save
#: Provenance file a trained model folder carries: the case ids its networks were trained on.
TRAINING_CASES = "training_cases.json"


def save_pipeline(pipe: DuoDiffusion, save_directory: str | os.PathLike, *, variant: str | None = None,
                  card: str | None = None, extra_files: Mapping[str, str] | None = None) -> Path:
    """Write ``pipe`` to ``save_directory`` atomically.

    Everything is written into a temporary sibling folder first and swapped in at the end, so a crash
    never leaves a half-written model where a good one was.

    Args:
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
    parent = target.parent if str(target.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    except OSError as e:
        raise OSError(f"Cannot write a model to {str(target)!r}: {e}. Choose a writable folder.") from e
    try:
        index = {
            "_class_name": "DuoDiffusion",
            "_duodiff_version": __version__,
            "pipeline": {k: v for k, v in cfg.to_dict().items() if k not in keys.COMPONENTS},
            keys.SCHEDULER: ["duodiff", "SchedulerConfig"],
        }
        for name in keys.COMPONENTS:
            module = getattr(pipe, name)
            index[name] = ["monai", type(module).__name__]
            sub = tmp / name
            sub.mkdir()
            (sub / keys.CONFIG_NAME).write_text(_json_dump(getattr(cfg, name).to_dict()))
            state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
            if variant == "fp16":
                state = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}
            save_file(state, str(sub / fname), metadata={"format": "pt", "component": name})
        (tmp / keys.SCHEDULER).mkdir()
        (tmp / keys.SCHEDULER / _SCHEDULER_CONFIG).write_text(_json_dump(cfg.scheduler.to_dict()))
        (tmp / "README.md").write_text(card if card is not None else model_card(pipe))
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
        (tmp / keys.MODEL_INDEX).write_text(_json_dump(index))
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
            if all(_same_weights(old, new) for old, new in pairs):
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


def _same_weights(a: Path, b: Path) -> bool:
    """Whether two safetensors files hold the same tensors up to fp16 rounding (variants of one model)."""
    try:
        sa, sb = load_file(str(a)), load_file(str(b))
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return False
    if sa.keys() != sb.keys():
        return False
    for k, va in sa.items():
        vb = sb[k]
        if va.shape != vb.shape or va.is_floating_point() != vb.is_floating_point():
            return False
        if va.is_floating_point() and not torch.equal(va.half(), vb.half()):
            return False
        if not va.is_floating_point() and not torch.equal(va, vb):
            return False
    return True


def model_card(pipe: DuoDiffusion, *, license: str = "other", extra: str = "") -> str:
    """A Hub model card (YAML front matter + Markdown) describing ``pipe``."""
    from .models import count_parameters

    c = pipe.config
    names = list(c.label_names)
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
        lines.append(f"| {name} parameters | {count_parameters(getattr(pipe, name)):,} |")
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


def load_state_dict_strict(module: torch.nn.Module, file: Path, *, component: str) -> None:
    """Load ``file`` (safetensors only) into ``module``: every key and shape must match."""
    if not file.is_file():
        raise FileNotFoundError(
            f"Missing weights {str(file)!r} for {component}. The folder is incomplete; save it again or pass the "
            "right variant= (None or 'fp16')."
        )
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(
            f"{str(file)!r} is not a valid safetensors file ({e}). It may be truncated or another format (duodiff "
            "never loads pickles); re-download or re-save the model, or import .pt files with `duodiff convert`."
        ) from e
    load_state_strict(module, state, source=repr(str(file)), component=component)


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], *, source: str, component: str) -> None:
    """Load an in-memory ``state`` into ``module``: every key and shape must match.

    Raises:
        ModelLoadError: keys are missing or unexpected, or shapes differ; the message names the first ones.
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelLoadError(
            f"Weights in {source} do not match {component}'s config: {len(missing)} missing key(s) "
            f"{missing[:3]}{'...' if len(missing) > 3 else ''}, {len(unexpected)} unexpected key(s) "
            f"{unexpected[:3]}{'...' if len(unexpected) > 3 else ''}. Use the config the weights were saved with."
        )
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items() if state[k].shape != v.shape]
    if wrong:
        k, got, want = wrong[0]
        raise ModelLoadError(
            f"Weights in {source} do not match {component}'s config: {len(wrong)} tensor(s) have the wrong shape, "
            f"e.g. {k!r} is {got} but the config builds {want}."
        )
    broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise ModelLoadError(
            f"Weights in {source} are broken: {len(broken)} tensor(s) of {component} contain NaN or Inf, e.g. "
            f"{broken[0]!r} (diverged training?). Use an earlier checkpoint."
        )
    target_dtype = next(iter(expected.values())).dtype
    state = {k: (v.to(target_dtype) if v.is_floating_point() else v) for k, v in state.items()}
    module.load_state_dict(state, strict=True)


def read_config(folder: Path) -> PipelineConfig:
    """Read and validate the :class:`PipelineConfig` stored in a model folder."""
    index_file = folder / keys.MODEL_INDEX
    if not index_file.is_file():
        raise FileNotFoundError(
            f"No {keys.MODEL_INDEX!r} in {str(folder)!r}. Pass a folder written by DuoDiffusion.save_pretrained() "
            "or a Hub repo id such as 'org/duodiff-hippocampus'."
        )
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{str(index_file)!r} is not valid JSON: {e}") from e
    if not isinstance(index, dict) or index.get("_class_name") != "DuoDiffusion":
        raise ConfigError(f"{str(index_file)!r} does not describe a DuoDiffusion pipeline (_class_name missing).")
    data = dict(index.get("pipeline", {}))
    for name in keys.COMPONENTS:
        cfile = folder / name / keys.CONFIG_NAME
        if not cfile.is_file():
            raise FileNotFoundError(
                f"Missing component folder or config {str(cfile)!r}. A DuoDiffusion folder needs "
                f"{list(keys.COMPONENTS)}; save the model again."
            )
        try:
            data[name] = json.loads(cfile.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{str(cfile)!r} is not valid JSON: {e}") from e
    sfile = folder / keys.SCHEDULER / _SCHEDULER_CONFIG
    if sfile.is_file():
        try:
            data[keys.SCHEDULER] = json.loads(sfile.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{str(sfile)!r} is not valid JSON: {e}") from e
    return PipelineConfig.from_dict(data)


def load_pipeline(
    cls: type[DuoDiffusion],
    path_or_repo_id: str | os.PathLike,
    *,
    revision: str | None = None,
    variant: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> DuoDiffusion:
    """Load a pipeline strictly from safetensors. See :meth:`DuoDiffusion.from_pretrained`."""
    from .models import build_component
    from .pipeline import resolve_dtype

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
                "Pass variant='fp16' to say so and silence this warning.", UserWarning, stacklevel=3,
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


# ---------------------------------------------------------------------------------------- push
def push_pipeline(
    pipe: DuoDiffusion,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    variant: str | None = None,
    commit_message: str = "Upload DuoDiffusion pipeline",
    license: str = "other",
) -> str:
    """Create ``repo_id`` if needed and upload the saved pipeline with a model card."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        save_pipeline(pipe, folder, variant=variant, card=model_card(pipe, license=license))
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                                 repo_type="model")
    return str(getattr(info, "commit_url", info))

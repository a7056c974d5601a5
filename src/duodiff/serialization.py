"""The model folder format: file names, strict safetensors loading and the stored config.

A DuoDiffusion folder (written by :mod:`duodiff.hub`)::

    model_index.json                 pipeline class, version, PipelineConfig metadata
    label_autoencoder/config.json    component config
    label_autoencoder/model.safetensors   (or model.fp16.safetensors)
    ... one folder per component ...
    scheduler/scheduler_config.json
    README.md                        model card

Weights are only ever read with ``safetensors`` and loaded strictly: every key and shape must match the config,
NaN/Inf is refused. Nothing is unpickled. The segmenter and ``duodiff convert`` load their weights through the
same functions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from . import keys
from .config import ConfigError, PipelineConfig

__all__ = [
    "PIPELINE_CLASS_NAME",
    "VARIANTS",
    "SCHEDULER_CONFIG",
    "TRAINING_CASES",
    "ModelLoadError",
    "weights_name",
    "json_dump",
    "read_json",
    "read_config",
    "load_state_dict_strict",
    "load_state_strict",
    "same_weights",
]

#: ``_class_name`` in ``model_index.json``: the format's name (also for subclasses of the pipeline).
PIPELINE_CLASS_NAME = "DuoDiffusion"
#: Weight variants: full precision (``None``) and half precision (``"fp16"``).
VARIANTS = (None, "fp16")
#: Scheduler config file inside the ``scheduler/`` folder.
SCHEDULER_CONFIG = "scheduler_config.json"
#: Provenance file a trained model folder carries: the case ids its networks were trained on.
TRAINING_CASES = "training_cases.json"


class ModelLoadError(ValueError):
    """A model folder is present but broken (corrupt weights, weights not matching the config, ...)."""


def weights_name(variant: str | None = None) -> str:
    """``model.safetensors`` or ``model.<variant>.safetensors``."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}.")
    return "model.safetensors" if variant is None else f"model.{variant}.safetensors"


def json_dump(data: Any) -> str:
    """``data`` as sorted, indented JSON text with a final newline (every JSON file of a model folder)."""
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def read_json(path: Path) -> Any:
    """The JSON value of the config file ``path``; a :class:`ConfigError` naming the file when it is not valid JSON
    (or not UTF-8 text)."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{str(path)!r} is not valid JSON: {e}") from e


def read_config(folder: Path) -> PipelineConfig:
    """Read and validate the :class:`PipelineConfig` stored in a model folder."""
    index_file = folder / keys.MODEL_INDEX
    if not index_file.is_file():
        raise FileNotFoundError(
            f"No {keys.MODEL_INDEX!r} in {str(folder)!r}. Pass a folder written by DuoDiffusion.save_pretrained() "
            "or a Hub repo id such as 'org/duodiff-hippocampus'."
        )
    index = read_json(index_file)
    if not isinstance(index, dict) or index.get("_class_name") != PIPELINE_CLASS_NAME:
        raise ConfigError(f"{str(index_file)!r} does not describe a DuoDiffusion pipeline (_class_name missing).")
    data = dict(index.get("pipeline", {}))
    for name in keys.COMPONENTS:
        cfile = folder / name / keys.CONFIG_NAME
        if not cfile.is_file():
            raise FileNotFoundError(
                f"Missing component folder or config {str(cfile)!r}. A DuoDiffusion folder needs "
                f"{list(keys.COMPONENTS)}; save the model again."
            )
        data[name] = read_json(cfile)
    sfile = folder / keys.SCHEDULER / SCHEDULER_CONFIG
    if sfile.is_file():
        data[keys.SCHEDULER] = read_json(sfile)
    return PipelineConfig.from_dict(data)


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


def same_weights(a: Path, b: Path) -> bool:
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

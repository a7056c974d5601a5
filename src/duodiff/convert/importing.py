"""Five checkpoints and an architecture -> a :class:`~duodiff.DuoDiffusion` and a duodiff model folder.

What ``duodiff convert`` runs: read the :class:`~duodiff.PipelineConfig`, import each component
(:func:`~duodiff.convert.import_component`), then save the pipeline and check that it reads back identically.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from .. import keys
from ..config import PipelineConfig
from ..serialization import ModelLoadError, read_json
from .monai_generative import ComponentImport, import_component
from .state_dicts import load_checkpoint

__all__ = ["read_pipeline_config", "import_checkpoints", "convert_checkpoints"]


def read_pipeline_config(path: str | os.PathLike) -> PipelineConfig:
    """Read a :class:`PipelineConfig` from a JSON file (``PipelineConfig.to_dict()``) or a duodiff model folder.

    Raises:
        FileNotFoundError: nothing at ``path``.
        ConfigError / TypeError: the JSON is invalid or does not describe a valid pipeline.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        from ..serialization import read_config

        return read_config(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No pipeline config at {str(path)!r}. Pass a JSON file holding PipelineConfig.to_dict() (e.g. from "
            "duodiff.make_config(...).to_dict()) or a duodiff model folder."
        )
    data = read_json(path)
    return PipelineConfig.from_dict(data)


def import_checkpoints(
    config: PipelineConfig | str | os.PathLike,
    checkpoints: Mapping[str, str | os.PathLike],
    *,
    key: str | None = None,
):
    """Build a :class:`~duodiff.DuoDiffusion` from five ``.pt`` state dicts.

    Args:
        config: the architecture (``PipelineConfig``, its JSON file, or a duodiff model folder), including
            ``label_scale_factor``/``image_scale_factor`` and the scheduler the networks were trained with.
            ``include_fc`` of each component is set from the checkpoint (see :mod:`duodiff.convert`).
        checkpoints: component name -> ``.pt`` path, for all of :data:`duodiff.keys.COMPONENTS`.
        key: entry holding the state dict inside wrapped checkpoints (see :func:`load_checkpoint`).

    Returns:
        ``(pipeline, infos)``: the pipeline and one :class:`ComponentImport` per component.
    """
    from ..pipeline import DuoDiffusion

    if not isinstance(config, PipelineConfig):
        config = read_pipeline_config(config)
    if not isinstance(checkpoints, Mapping):
        raise TypeError(f"checkpoints must map component names to .pt paths, got {type(checkpoints).__name__}.")
    missing, unknown = keys.component_mismatch(checkpoints)
    if missing or unknown:
        raise ValueError(
            f"checkpoints needs one .pt file for each of {list(keys.COMPONENTS)}; missing {missing}, unknown {unknown}."
        )
    modules, infos, changes = {}, [], {}
    for name in keys.COMPONENTS:
        path = Path(checkpoints[name]).expanduser()
        state = load_checkpoint(path, key=key)
        module, info = import_component(name, config, state, source=repr(str(path)))
        modules[name] = module
        infos.append(info)
        changes[name] = getattr(config, name).replace(include_fc=info.include_fc)
    return DuoDiffusion(config.replace(**changes), modules), infos


def convert_checkpoints(
    config: PipelineConfig | str | os.PathLike,
    checkpoints: Mapping[str, str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    key: str | None = None,
    overwrite: bool = False,
) -> list[ComponentImport]:
    """Import five ``.pt`` state dicts (see :func:`import_checkpoints`) and write a duodiff folder.

    The folder is written atomically with ``save_pretrained`` and read back with ``from_pretrained``;
    every tensor must come back identical.

    Args:
        out_dir: destination folder; must not exist or be empty unless ``overwrite=True``.

    Returns:
        one :class:`ComponentImport` per component.

    Raises:
        FileExistsError: ``out_dir`` is a non-empty folder (or a file) and ``overwrite`` is False.
    """
    from ..pipeline import DuoDiffusion

    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"Output {str(out)!r} exists and is not a folder; choose another --out.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"Output folder {str(out)!r} is not empty; choose another --out or pass overwrite=True (--overwrite)."
        )
    pipe, infos = import_checkpoints(config, checkpoints, key=key)
    pipe.save_pretrained(out)
    back = DuoDiffusion.from_pretrained(out)
    for name in keys.COMPONENTS:
        a, b = getattr(pipe, name).state_dict(), getattr(back, name).state_dict()
        bad = [k for k in a if not torch.equal(a[k], b[k])]
        if bad:  # pragma: no cover - would be a bug in save/load
            raise ModelLoadError(f"{name} did not round-trip through {str(out)!r}: {bad[:3]} differ.")
    return infos

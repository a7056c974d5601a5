"""Import networks trained with MONAI Generative 0.2.3 (the original paper's stack) or MONAI core.

Old checkpoints are PyTorch ``.pt`` files. They are read with ``torch.load(weights_only=True)``, which
refuses arbitrary Python objects, converted to MONAI-core key names, loaded strictly and written as a
normal duodiff folder (safetensors only). Normal loading never reads ``.pt`` files.

Two quirks of MONAI Generative 0.2.3 decide how its weights map onto MONAI core (see ``FACTS.md``):

* its plain self-attention blocks (autoencoders, and UNets/ControlNets without cross-attention
  conditioning) define ``proj_attn`` but never apply it, so those networks are rebuilt with
  ``include_fc=False`` and the unused ``proj_attn`` tensors are dropped;
* ``ControlNet.load_old_state_dict`` in MONAI core is broken, so ControlNet keys are renamed here.

Example:
    >>> from duodiff.convert import convert_checkpoints
    >>> convert_checkpoints("config.json", {"label_autoencoder": "lae.pt", ...}, "model/")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import keys
from .config import AutoencoderConfig, ConfigError, PipelineConfig, UNetConfig
from .serialization import ModelLoadError, load_state_strict

__all__ = [
    "ComponentImport",
    "read_pipeline_config",
    "load_checkpoint",
    "import_component",
    "rename_old_controlnet_keys",
    "strip_wrapper_prefixes",
    "import_checkpoints",
    "convert_checkpoints",
]

#: Prefixes added by ``DistributedDataParallel`` / ``DataParallel`` and ``torch.compile``; stripped (in any
#: order and nesting) while every key has one.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
#: ``torch.compile`` of a submodule puts ``_orig_mod.`` inside keys (``encoder._orig_mod.conv.weight``).
_COMPILED_SUBMODULE = re.compile(r"(?:^|(?<=\.))_orig_mod\.")

# An old self-attention block is ``...attentions.<i>`` or ``middle_block.attention`` (not a transformer block).
_OLD_ATTN = r"(?P<block>(?:.*\.)?(?:attentions\.\d+|middle_block\.attention))"
_OLD_QKV = re.compile(_OLD_ATTN + r"\.(?P<proj>to_q|to_k|to_v)\.(?P<param>weight|bias)$")
_OLD_PROJ_ATTN = re.compile(r"(?:^|\.)proj_attn\.(?:weight|bias)$")  # never applied by 0.2.3's attention blocks
_OLD_TO_OUT = re.compile(r"^(?P<prefix>.*)\.to_out\.0\.(?P<param>weight|bias)$")


@dataclass(frozen=True)
class ComponentImport:
    """What :func:`import_component` did with one checkpoint.

    Attributes:
        component: pipeline component name, e.g. ``"image_controlnet"``.
        source_format: ``"monai"`` (MONAI-core keys, loaded as is) or ``"monai-generative"`` (converted).
        include_fc: the ``include_fc`` the network was built with (stored in its config).
        num_tensors: tensors in the imported network.
        dropped: old tensors left out because MONAI Generative 0.2.3 never used them (``proj_attn``).
    """

    component: str
    source_format: str
    include_fc: bool
    num_tensors: int
    dropped: tuple[str, ...] = ()

    def __str__(self) -> str:
        extra = f", dropped {len(self.dropped)} unused proj_attn tensor(s)" if self.dropped else ""
        return (f"{self.component}: {self.source_format} format, include_fc={self.include_fc}, "
                f"{self.num_tensors} tensors{extra}")


# ------------------------------------------------------------------------------------------ reading
def read_pipeline_config(path: str | os.PathLike) -> PipelineConfig:
    """Read a :class:`PipelineConfig` from a JSON file (``PipelineConfig.to_dict()``) or a duodiff model folder.

    Raises:
        FileNotFoundError: nothing at ``path``.
        ConfigError / TypeError: the JSON is invalid or does not describe a valid pipeline.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        from .serialization import read_config

        return read_config(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No pipeline config at {str(path)!r}. Pass a JSON file holding PipelineConfig.to_dict() (e.g. from "
            "duodiff.make_config(...).to_dict()) or a duodiff model folder."
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{str(path)!r} is not valid JSON: {e}") from e
    return PipelineConfig.from_dict(data)


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def load_checkpoint(path: str | os.PathLike, *, key: str | None = None) -> dict[str, torch.Tensor]:
    """Read a PyTorch state dict safely with ``torch.load(weights_only=True)`` (never arbitrary unpickling).

    Accepts a plain state dict, or a checkpoint dict holding exactly one state dict (e.g. MONAI bundle /
    training checkpoints ``{"model": {...}, "epoch": 3}``); ``key`` picks one when there are several.
    Wrapper prefixes (``module.`` of DDP / DataParallel, ``_orig_mod.`` of ``torch.compile``, in any
    nesting) are removed (:func:`strip_wrapper_prefixes`).

    Returns:
        ``{name: tensor}`` on the CPU.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is empty, not a PyTorch file, holds Python objects other than tensors and
            containers, holds NaN/Inf weights, or holds no (or several) state dicts.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint file at {str(path)!r}.")
    if path.stat().st_size == 0:
        raise ValueError(f"Checkpoint {str(path)!r} is empty (0 bytes).")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"Checkpoint {str(path)!r} holds Python objects other than tensors (e.g. a whole pickled model), which "
            "duodiff refuses to unpickle. In the environment that made it, re-save only the weights: "
            f"torch.save(model.state_dict(), 'weights.pt'). ({str(e).splitlines()[0]})"
        ) from e
    except Exception as e:  # torch raises RuntimeError/EOFError/... for corrupt or foreign files
        raise ValueError(
            f"{str(path)!r} is not a readable PyTorch checkpoint ({type(e).__name__}: {_short(e)}). It may be "
            "truncated or another format."
        ) from e
    state = strip_wrapper_prefixes(_select_state_dict(obj, path, key), source=repr(str(path)))
    _check_finite(state, repr(str(path)))
    return state


def strip_wrapper_prefixes(state: Mapping[str, torch.Tensor], *, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The state dict of the network inside ``DistributedDataParallel`` / ``DataParallel`` / ``torch.compile``.

    Wrappers rename every key: DDP and DataParallel add ``module.``, ``torch.compile`` adds ``_orig_mod.``,
    and nested wrappers stack them (``torch.compile(DDP(net))`` -> ``_orig_mod.module.``). Leading prefixes
    shared by *every* key are removed until none is left, and ``_orig_mod.`` segments inside keys (a compiled
    submodule) are dropped. Tensors are not copied or changed.

    Example:
        >>> sorted(strip_wrapper_prefixes({"_orig_mod.module.conv.weight": torch.zeros(1)}))
        ['conv.weight']

    Raises:
        ValueError: two keys become the same name (the state dict is not one wrapped network).
    """
    out = dict(state)
    stripped = True
    while out and stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in out):
                out = {k[len(prefix):]: v for k, v in out.items()}
                stripped = True
    renamed = {_COMPILED_SUBMODULE.sub("", k): v for k, v in out.items()}
    if len(renamed) != len(out):
        clash = sorted(k for k in out if _COMPILED_SUBMODULE.sub("", k) != k)[:3]
        raise ValueError(
            f"Checkpoint {source}: keys such as {clash} collide with other keys once the torch.compile prefix "
            "'_orig_mod.' is removed; save the weights of one unwrapped network (model.state_dict())."
        )
    return renamed


def _check_finite(state: Mapping[str, torch.Tensor], source: str) -> None:
    for k, v in state.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ValueError(f"Checkpoint {source}: tensor {k!r} contains NaN or Inf; the weights are broken.")


def _select_state_dict(obj: object, path: Path, key: str | None) -> dict[str, torch.Tensor]:
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            found = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
            raise ValueError(f"Checkpoint {str(path)!r} has no entry {key!r}; it holds {found}.")
        obj = obj[key]
        if not _is_state_dict(obj):
            raise ValueError(f"Entry {key!r} of checkpoint {str(path)!r} is not a state dict (name -> tensor).")
        return dict(obj)
    if _is_state_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        nested = [str(k) for k, v in obj.items() if _is_state_dict(v)]
        if len(nested) == 1:
            return dict(obj[nested[0]])
        if len(nested) > 1:
            raise ValueError(
                f"Checkpoint {str(path)!r} holds several state dicts {nested}; choose one with key= (--key)."
            )
        entries = sorted(map(str, obj))[:10]
        raise ValueError(f"Checkpoint {str(path)!r} holds no state dict (name -> tensor); its entries are {entries}.")
    raise ValueError(f"Checkpoint {str(path)!r} holds a {type(obj).__name__}, not a state dict (name -> tensor).")


# ------------------------------------------------------------------------------------------ converting
def _legacy_include_fc(cfg: AutoencoderConfig | UNetConfig) -> bool:
    """``include_fc`` that reproduces MONAI Generative 0.2.3.

    Its plain attention blocks never apply ``proj_attn`` (-> ``False``); its cross-attention transformer
    blocks (UNets with conditioning) do apply their output projection (-> ``True``).
    """
    return isinstance(cfg, UNetConfig) and cfg.with_conditioning


def rename_old_controlnet_keys(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """MONAI Generative 0.2.3 ControlNet keys -> MONAI-core keys (``include_fc=False`` for plain attention).

    ``<attn>.to_q/k/v.*`` -> ``<attn>.attn.to_q/k/v.*``; ``...to_out.0.*`` -> ``...out_proj.*``; the
    never-applied ``<attn>.proj_attn.*`` are dropped. Returns the renamed dict and the dropped keys.
    """
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for k, v in state.items():
        if _OLD_PROJ_ATTN.search(k):
            dropped.append(k)
            continue
        m = _OLD_QKV.match(k)
        if m:
            k = f"{m['block']}.attn.{m['proj']}.{m['param']}"
        else:
            m = _OLD_TO_OUT.match(k)
            if m:
                k = f"{m['prefix']}.out_proj.{m['param']}"
        out[k] = v
    return out, dropped


def _short(e: BaseException) -> str:
    """The informative line of a (possibly long, multi-line) torch loading error."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    detail = [ln for ln in lines if ln.startswith(("size mismatch", "Missing key", "Unexpected key"))]
    return (detail or lines or [type(e).__name__])[0][:300]


def _load_with_monai_legacy(module: nn.Module, state: dict[str, torch.Tensor], *, source: str,
                            component: str) -> list[str]:
    """Load old weights with MONAI's ``load_old_state_dict`` and check nothing was skipped or left unset.

    MONAI's loader copies matching keys into the module's own state and only fails for missing
    attention keys, so a missing tensor would silently keep its random init. Every floating tensor is
    set to NaN first; any NaN left afterwards names a tensor the checkpoint did not provide.
    """
    with torch.no_grad():
        for t in module.state_dict().values():
            if t.is_floating_point():
                t.fill_(float("nan"))
    old = dict(state)  # load_old_state_dict pops the keys it uses
    expected = set(module.state_dict())
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it print()s
            module.load_old_state_dict(old)
    except KeyError as e:
        raise ModelLoadError(
            f"Weights in {source} do not match {component}'s config: the network the config builds needs tensor "
            f"{e.args[0]!r}, which the checkpoint lacks. Check channels, num_res_blocks and attention_levels against "
            "the architecture the checkpoint was trained with."
        ) from e
    except RuntimeError as e:
        raise ModelLoadError(
            f"Weights in {source} do not match {component}'s config: {_short(e)}. Check the config against the "
            "architecture the checkpoint was trained with."
        ) from e
    # with include_fc=False there is no out_proj: MONAI pops (AutoencoderKL) or leaves (UNet) proj_attn
    dropped = sorted(k for k in state if _OLD_PROJ_ATTN.search(k) and k not in expected)
    unused = [] if set(state) <= expected else sorted(k for k in old if k not in dropped)
    unset = [k for k, t in module.state_dict().items() if t.is_floating_point() and torch.isnan(t).any()]
    if unused or unset:
        raise ModelLoadError(
            f"Weights in {source} do not match {component}'s config: {len(unset)} tensor(s) the config builds are "
            f"not in the checkpoint {unset[:3]}, {len(unused)} checkpoint tensor(s) have no place in it "
            f"{unused[:3]}. Check the config against the architecture the checkpoint was trained with."
        )
    return dropped


def import_component(
    name: str, config: PipelineConfig, state: Mapping[str, torch.Tensor], *, source: str = "checkpoint"
) -> tuple[nn.Module, ComponentImport]:
    """Build component ``name`` of ``config`` and load ``state`` (MONAI-core or MONAI Generative 0.2.3 keys).

    Keys saved from a wrapped network (DDP, DataParallel, ``torch.compile``, nested) are unwrapped first
    (:func:`strip_wrapper_prefixes`). The format is detected from the keys: a state dict whose keys are
    exactly those of the network built from ``config`` loads as is; anything else is treated as MONAI
    Generative 0.2.3 and converted.

    Returns:
        the loaded network (eval mode) and a :class:`ComponentImport` whose ``include_fc`` must be stored
        in the component's config (``import_checkpoints`` does this).

    Raises:
        ModelLoadError: the weights do not fit the architecture described by ``config``.
    """
    from .models import build_component

    if name not in keys.COMPONENTS:
        raise ValueError(f"Unknown component {name!r}; expected one of {list(keys.COMPONENTS)}.")
    cfg = getattr(config, name)
    state = strip_wrapper_prefixes(state, source=source)
    _check_finite(state, source)  # also keeps the NaN sentinel of _load_with_monai_legacy unambiguous
    module = build_component(name, config)
    if set(state) == set(module.state_dict()):
        load_state_strict(module, state, source=source, component=name)
        return module.eval(), ComponentImport(name, "monai", cfg.include_fc, len(state))
    include_fc = _legacy_include_fc(cfg)
    module = build_component(name, config.replace(**{name: cfg.replace(include_fc=include_fc)}))
    if name == "image_controlnet":  # MONAI's ControlNet.load_old_state_dict is broken (FACTS.md)
        renamed, dropped = rename_old_controlnet_keys(state)
        load_state_strict(module, renamed, source=source, component=name)
    else:
        dropped = _load_with_monai_legacy(module, state, source=source, component=name)
    info = ComponentImport(name, "monai-generative", include_fc, len(module.state_dict()), tuple(dropped))
    return module.eval(), info


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
    from .pipeline import DuoDiffusion

    if not isinstance(config, PipelineConfig):
        config = read_pipeline_config(config)
    if not isinstance(checkpoints, Mapping):
        raise TypeError(f"checkpoints must map component names to .pt paths, got {type(checkpoints).__name__}.")
    missing = [k for k in keys.COMPONENTS if k not in checkpoints]
    unknown = sorted(set(checkpoints) - set(keys.COMPONENTS))
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
    from .pipeline import DuoDiffusion

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

"""MONAI Generative 0.2.3 (the original paper's stack) -> MONAI core: key mapping and strict import of one network.

Two quirks of MONAI Generative 0.2.3 decide how its weights map onto MONAI core (see ``FACTS.md``):

* its plain self-attention blocks (autoencoders, and UNets/ControlNets without cross-attention
  conditioning) define ``proj_attn`` but never apply it, so those networks are rebuilt with
  ``include_fc=False`` and the unused ``proj_attn`` tensors are dropped;
* ``ControlNet.load_old_state_dict`` in MONAI core is broken, so ControlNet keys are renamed here.

:func:`import_component` also loads MONAI-core state dicts as they are (the format is detected from the keys).
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .. import keys
from ..config import AutoencoderConfig, PipelineConfig, UNetConfig
from ..serialization import ModelLoadError, load_state_strict
from .state_dicts import _check_finite, _short, strip_wrapper_prefixes

__all__ = ["ComponentImport", "import_component", "rename_old_controlnet_keys"]

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
    from ..models import build_component

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

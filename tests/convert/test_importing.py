"""`duodiff convert`: importing MONAI Generative 0.2.3 / MONAI-core ``.pt`` state dicts.

The parity tests build the old networks with ``monai-generative==0.2.3`` (test extra, installed with
``pip install --no-deps monai-generative==0.2.3``) and skip cleanly without it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from duodiff import DuoDiffusion, PipelineConfig, keys, make_config
from duodiff.convert import (
    convert_checkpoints,
    import_checkpoints,
    import_component,
    load_checkpoint,
    read_pipeline_config,
    rename_old_controlnet_keys,
)
from duodiff.hub import ModelLoadError

TOL = 1e-5


def _old_nets():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("generative.networks.nets", reason="needs monai-generative==0.2.3 (test extra)")


def parity_config(**kwargs) -> PipelineConfig:
    """The tiny preset with attention everywhere MONAI Generative had it (AE levels + non-local, UNet levels)."""
    cfg = make_config("tiny", num_classes=3, **kwargs)
    changes = {}
    for name in ("label_autoencoder", "image_autoencoder"):
        changes[name] = getattr(cfg, name).replace(
            attention_levels=(False, True), with_encoder_nonlocal_attn=True, with_decoder_nonlocal_attn=True
        )
    return cfg.replace(**changes)


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module.eval()


def build_old(name: str, config: PipelineConfig, seed: int = 0) -> torch.nn.Module:
    """The MONAI Generative 0.2.3 network described by component ``name`` of ``config`` (random weights)."""
    nets = _old_nets()
    c = getattr(config, name)
    common = dict(spatial_dims=3, in_channels=c.in_channels, num_channels=c.channels, num_res_blocks=c.num_res_blocks,
                  attention_levels=c.attention_levels, norm_num_groups=c.norm_num_groups)
    with torch.random.fork_rng(devices=[]):  # old constructors take no generator; keep the global RNG untouched
        torch.manual_seed(seed)
        net = _construct(nets, name, c, common)
    return _randomize(net, seed + 1)


def _construct(nets, name, c, common) -> torch.nn.Module:
    if name.endswith("autoencoder"):
        net = nets.AutoencoderKL(out_channels=c.out_channels, latent_channels=c.latent_channels,
                                 with_encoder_nonlocal_attn=c.with_encoder_nonlocal_attn,
                                 with_decoder_nonlocal_attn=c.with_decoder_nonlocal_attn, **common)
    else:
        unet = dict(num_head_channels=c.num_head_channels, resblock_updown=c.resblock_updown,
                    with_conditioning=c.with_conditioning, cross_attention_dim=c.cross_attention_dim, **common)
        if name == "image_controlnet":
            net = nets.ControlNet(conditioning_embedding_in_channels=c.conditioning_embedding_in_channels,
                                  conditioning_embedding_num_channels=c.conditioning_embedding_num_channels, **unet)
        else:
            net = nets.DiffusionModelUNet(out_channels=c.out_channels, **unet)
    return net


def save_old(config: PipelineConfig, folder: Path) -> tuple[dict[str, torch.nn.Module], dict[str, Path]]:
    folder.mkdir(parents=True, exist_ok=True)
    olds, paths = {}, {}
    for i, name in enumerate(keys.COMPONENTS):
        olds[name] = build_old(name, config, seed=10 * i)
        paths[name] = folder / f"{name}.pt"
        torch.save(olds[name].state_dict(), paths[name])
    return olds, paths


def _max_diff(a, b) -> float:
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        return max(_max_diff(x, y) for x, y in zip(a, b))
    assert a.shape == b.shape
    return float((a - b).abs().max())


def compare(name: str, old: torch.nn.Module, new: torch.nn.Module, config: PipelineConfig, seed: int = 0) -> float:
    """Max |old - new| over the network's outputs on seeded random inputs."""
    g = torch.Generator().manual_seed(seed)
    c = getattr(config, name)
    shape = tuple(config.volume_shape)
    with torch.no_grad():
        if name.endswith("autoencoder"):
            x = torch.rand((2, c.in_channels, *shape), generator=g)
            mu_o, sd_o = old.encode(x)
            mu_n, sd_n = new.encode(x)
            z = torch.randn(mu_o.shape, generator=g)
            return max(_max_diff(mu_o, mu_n), _max_diff(sd_o, sd_n), _max_diff(old.decode(z), new.decode(z)))
        f = (config.label_autoencoder if name == "label_unet" else config.image_autoencoder).downsample_factor
        x = torch.randn((2, c.in_channels, *(s // f for s in shape)), generator=g)
        t = torch.tensor([3, 700])
        ctx = torch.randn((2, 1, c.cross_attention_dim), generator=g) if c.with_conditioning else None
        if name == "image_controlnet":
            cond = torch.rand((2, c.conditioning_embedding_in_channels, *shape), generator=g)
            return _max_diff(old(x, t, controlnet_cond=cond, conditioning_scale=0.7, context=ctx),
                             new(x, t, controlnet_cond=cond, conditioning_scale=0.7, context=ctx))
        return _max_diff(old(x, t, context=ctx), new(x, t, context=ctx))


# ------------------------------------------------------------------------------------------ parity
def test_parity_all_components_through_a_converted_folder(tmp_path):
    config = parity_config()
    olds, paths = save_old(config, tmp_path / "old")
    infos = convert_checkpoints(config, paths, tmp_path / "model")
    assert [i.source_format for i in infos] == ["monai-generative"] * 5
    assert all(i.include_fc is False for i in infos)
    assert all(i.dropped for i in infos), "every network has attention, so unused proj_attn tensors were dropped"
    pipe = DuoDiffusion.from_pretrained(tmp_path / "model")
    for name in keys.COMPONENTS:
        assert getattr(pipe.config, name).include_fc is False
        assert compare(name, olds[name], getattr(pipe, name), config) <= TOL, name
    # the ControlNet residuals drive the UNet exactly as before
    g = torch.Generator().manual_seed(1)
    x = torch.randn((1, *config.image_latent_shape), generator=g)
    cond = torch.rand((1, config.num_classes, *config.volume_shape), generator=g)
    t = torch.tensor([500])
    with torch.no_grad():
        outs = []
        for cn, un in ((olds["image_controlnet"], olds["image_unet"]), (pipe.image_controlnet, pipe.image_unet)):
            down, mid = cn(x, t, controlnet_cond=cond)
            outs.append(un(x, t, down_block_additional_residuals=down, mid_block_additional_residual=mid))
    assert _max_diff(*outs) <= TOL
    out = pipe.sample(1, seed=0, num_inference_steps=2, progress=False)
    assert out.images.shape == (1, 1, *config.volume_shape)


def test_parity_conditioned_unet_keeps_output_projection(tmp_path):
    config = parity_config(attributes=("volume",))
    old = build_old("label_unet", config)
    module, info = import_component("label_unet", config, old.state_dict())
    assert info.source_format == "monai-generative" and info.include_fc is True and not info.dropped
    assert compare("label_unet", old, module, config) <= TOL


def test_parity_conditioned_controlnet(tmp_path):
    config = parity_config()
    unet = config.image_unet.replace(with_conditioning=True, cross_attention_dim=8)
    config = config.replace(image_unet=unet, image_controlnet=config.image_controlnet.replace(
        with_conditioning=True, cross_attention_dim=8))
    old = build_old("image_controlnet", config)
    module, info = import_component("image_controlnet", config, old.state_dict())
    assert info.include_fc is True
    assert compare("image_controlnet", old, module, config) <= TOL


def test_monai_core_controlnet_loader_is_not_used():
    """Our ControlNet renaming: q/k/v under ``.attn``, ``to_out.0`` -> ``out_proj``, ``proj_attn`` dropped."""
    state = {
        "down_blocks.1.attentions.0.to_q.weight": torch.zeros(1),
        "middle_block.attention.to_v.bias": torch.zeros(1),
        "middle_block.attention.proj_attn.weight": torch.zeros(1),
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0.weight": torch.zeros(1),
        "controlnet_down_blocks.0.conv.weight": torch.zeros(1),
    }
    renamed, dropped = rename_old_controlnet_keys(state)
    assert sorted(renamed) == sorted([
        "down_blocks.1.attentions.0.attn.to_q.weight",
        "middle_block.attention.attn.to_v.bias",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.out_proj.weight",
        "controlnet_down_blocks.0.conv.weight",
    ])
    assert dropped == ["middle_block.attention.proj_attn.weight"]


# ------------------------------------------------------------------------------------------ formats
def _save_state_dicts(pipe: DuoDiffusion, folder: Path, wrap=lambda sd: sd) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in keys.COMPONENTS:
        paths[name] = folder / f"{name}.pt"
        torch.save(wrap(getattr(pipe, name).state_dict()), paths[name])
    return paths


def _assert_same_weights(a: DuoDiffusion, b: DuoDiffusion) -> None:
    for name in keys.COMPONENTS:
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name


def test_monai_core_state_dicts_load_as_is(tiny_pipe, tmp_path):
    paths = _save_state_dicts(tiny_pipe, tmp_path / "pt")
    (tmp_path / "config.json").write_text(__import__("json").dumps(tiny_pipe.config.to_dict()))
    infos = convert_checkpoints(tmp_path / "config.json", paths, tmp_path / "model")
    assert [i.source_format for i in infos] == ["monai"] * 5
    _assert_same_weights(tiny_pipe, DuoDiffusion.from_pretrained(tmp_path / "model"))


def test_wrapped_and_ddp_prefixed_checkpoints(tiny_pipe, tmp_path):
    def wrap(sd):
        return {"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 7, "optimizer": {"lr": 1e-4}}

    paths = _save_state_dicts(tiny_pipe, tmp_path / "pt", wrap)
    pipe, _ = import_checkpoints(tiny_pipe.config, paths)
    _assert_same_weights(tiny_pipe, pipe)


@pytest.fixture
def process_group(tmp_path_factory):
    """A one-process gloo group for one test, so real ``DistributedDataParallel`` wrappers build on the CPU."""
    import torch.distributed as dist

    if dist.is_initialized():  # pragma: no cover - another test left one
        yield
        return
    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


_WRAPPERS = {
    "ddp": lambda m: torch.nn.parallel.DistributedDataParallel(m),
    "dp": torch.nn.DataParallel,
    "compile": torch.compile,  # an OptimizedModule: keys get "_orig_mod."; nothing compiles until it is called
}


#: innermost wrapper first: ("ddp", "compile") is torch.compile(DDP(net)), keys "_orig_mod.module.*"
_WRAPPER_COMBOS = [
    ("ddp",), ("dp",), ("compile",),
    ("ddp", "compile"), ("compile", "ddp"), ("compile", "dp"), ("dp", "compile"), ("dp", "ddp"), ("ddp", "dp"),
    ("compile", "ddp", "compile"), ("dp", "compile", "ddp"), ("ddp", "dp", "compile"),
]


def _wrapped_state(module: torch.nn.Module, combo: tuple[str, ...]) -> dict[str, torch.Tensor]:
    import copy

    net = copy.deepcopy(module)  # DDP registers hooks on its module: never wrap the shared fixture
    for name in combo:
        net = _WRAPPERS[name](net)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("combo", _WRAPPER_COMBOS, ids=["+".join(c) for c in _WRAPPER_COMBOS])
def test_checkpoints_of_wrapped_models_import_identically(tiny_pipe, tmp_path, process_group, combo):
    """DDP / DataParallel / torch.compile in any nesting: the same weights, never blamed on the config."""
    folder = tmp_path / "pt"
    folder.mkdir()
    paths = {}
    for name in keys.COMPONENTS:
        state = _wrapped_state(getattr(tiny_pipe, name), combo)
        assert all(k.startswith(("module.", "_orig_mod.")) for k in state)
        paths[name] = folder / f"{name}.pt"
        torch.save({"model": state, "epoch": 3}, paths[name])  # a training checkpoint around it
    pipe, infos = import_checkpoints(tiny_pipe.config, paths)
    assert [i.source_format for i in infos] == ["monai"] * 5
    _assert_same_weights(tiny_pipe, pipe)
    # the in-memory path (import_component) unwraps the same way
    state = _wrapped_state(tiny_pipe.image_unet, combo)
    module, _ = import_component("image_unet", tiny_pipe.config, state)
    assert all(torch.equal(v, tiny_pipe.image_unet.state_dict()[k]) for k, v in module.state_dict().items())


def test_checkpoint_with_a_compiled_submodule_imports_identically(tiny_pipe, process_group):
    import copy

    net = copy.deepcopy(tiny_pipe.label_autoencoder)
    net.decoder = torch.compile(net.decoder)  # keys "decoder._orig_mod.*"
    state = _wrapped_state(net, ("compile", "ddp"))
    assert any(k.startswith("module._orig_mod.decoder._orig_mod.") for k in state)
    module, info = import_component("label_autoencoder", tiny_pipe.config, state)
    assert info.source_format == "monai"
    expected = tiny_pipe.label_autoencoder.state_dict()
    assert module.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in module.state_dict().items())


@pytest.mark.parametrize("combo", [(), ("ddp",), ("ddp", "compile"), ("compile", "dp", "ddp")])
def test_wrong_checkpoint_in_wrappers_still_gets_the_config_error(tiny_pipe, tmp_path, process_group, combo):
    """Unwrapping never hides a real mismatch: a wider UNet's weights do not fit the tiny image UNet."""
    from duodiff.models import build_component

    cfg = tiny_pipe.config
    wider = cfg.replace(image_unet=cfg.image_unet.replace(channels=(8, 24)),
                        image_controlnet=cfg.image_controlnet.replace(channels=(8, 24)))
    state = _wrapped_state(build_component("image_unet", wider), combo)
    with pytest.raises(ModelLoadError, match="image_unet's config"):
        import_component("image_unet", tiny_pipe.config, state)
    torch.save(state, tmp_path / "wrong.pt")
    paths = _save_state_dicts(tiny_pipe, tmp_path / "pt")
    paths["image_unet"] = tmp_path / "wrong.pt"
    with pytest.raises(ModelLoadError, match="image_unet's config"):
        import_checkpoints(tiny_pipe.config, paths)


def test_prefix_on_only_some_keys_is_not_stripped(tiny_pipe):
    state = dict(tiny_pipe.image_unet.state_dict())
    first = next(iter(state))
    state[f"module.{first}"] = state.pop(first)
    with pytest.raises(ModelLoadError, match=r"image_unet's config"):
        import_component("image_unet", tiny_pipe.config, state)


def test_keys_colliding_after_unwrapping_are_refused(tiny_pipe):
    from duodiff.convert import strip_wrapper_prefixes

    w = torch.zeros(1)
    assert strip_wrapper_prefixes({"_orig_mod.module.a._orig_mod.b": w}) == {"a.b": w}
    with pytest.raises(ValueError, match="collide"):
        strip_wrapper_prefixes({"a._orig_mod.b": w, "a.b": w})


def test_wrapped_legacy_checkpoint_converts_with_parity(tmp_path, process_group):
    """A MONAI Generative 0.2.3 network trained under torch.compile(DDP(...)) converts like an unwrapped one."""
    config = parity_config()
    old = build_old("image_unet", config, seed=3)
    module, info = import_component("image_unet", config, _wrapped_state(old, ("ddp", "compile")))
    assert info.source_format == "monai-generative"
    assert compare("image_unet", old, module, config) <= TOL


def test_several_state_dicts_need_a_key(tiny_pipe, tmp_path):
    sd = tiny_pipe.label_unet.state_dict()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": sd, "ema": sd}, path)
    with pytest.raises(ValueError, match=r"several state dicts \['model', 'ema'\].*key="):
        load_checkpoint(path)
    assert load_checkpoint(path, key="ema").keys() == sd.keys()
    with pytest.raises(ValueError, match="no entry 'nope'"):
        load_checkpoint(path, key="nope")


def test_pickled_model_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "payload": Evil()}, path)
    with pytest.raises(ValueError, match="refuses to unpickle"):
        load_checkpoint(path)
    assert not marker.exists()
    whole = tmp_path / "whole.pt"
    torch.save(torch.nn.Linear(2, 2), whole)
    with pytest.raises(ValueError, match=r"torch.save\(model.state_dict\(\)"):
        load_checkpoint(whole)


def test_missing_tensor_is_not_silently_left_at_init(tmp_path):
    """MONAI's load_old_state_dict keeps the random init for keys the checkpoint lacks; convert must not."""
    config = parity_config()
    state = build_old("image_unet", config).state_dict()
    del state["out.2.conv.weight"]
    with pytest.raises(ModelLoadError, match=r"image_unet.*out\.2\.conv\.weight"):
        import_component("image_unet", config, state)


def test_extra_tensor_is_reported(tmp_path):
    config = parity_config()
    state = build_old("label_autoencoder", config).state_dict()
    state["encoder.extra.weight"] = torch.zeros(3)
    with pytest.raises(ModelLoadError, match=r"label_autoencoder.*encoder\.extra\.weight"):
        import_component("label_autoencoder", config, state)


def test_checkpoint_of_another_architecture_is_reported():
    config = parity_config()
    wider = dict(channels=(8, 24), norm_num_groups=8, num_head_channels=8)
    other = config.replace(image_unet=config.image_unet.replace(**wider),
                           image_controlnet=config.image_controlnet.replace(**wider))
    state = build_old("image_unet", other).state_dict()
    with pytest.raises(ModelLoadError, match="image_unet's config"):
        import_component("image_unet", config, state)
    state = build_old("image_controlnet", other).state_dict()
    with pytest.raises(ModelLoadError, match=r"image_controlnet's config.*wrong shape"):
        import_component("image_controlnet", config, state)


def test_all_five_checkpoints_are_required(tiny_pipe, tmp_path):
    paths = _save_state_dicts(tiny_pipe, tmp_path / "pt")
    del paths["image_controlnet"]
    with pytest.raises(ValueError, match=r"missing \['image_controlnet'\]"):
        import_checkpoints(tiny_pipe.config, paths)


def test_read_pipeline_config_errors(tmp_path, tiny_model_dir):
    assert read_pipeline_config(tiny_model_dir).num_classes == 3
    with pytest.raises(FileNotFoundError, match="No pipeline config"):
        read_pipeline_config(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_pipeline_config(bad)


def test_nan_weights_are_refused(tiny_pipe, tmp_path):
    state = {k: v.clone() for k, v in tiny_pipe.image_unet.state_dict().items()}
    first = next(iter(state))
    state[first][...] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match=f"tensor '{first}' contains NaN or Inf"):
        load_checkpoint(tmp_path / "nan.pt")
    with pytest.raises(ValueError, match="NaN or Inf"):
        import_component("image_unet", tiny_pipe.config, state)

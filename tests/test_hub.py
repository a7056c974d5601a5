"""save_pretrained / from_pretrained: exact round trips, fp16 variant, offline Hub cache, atomic saves,
strict safetensors-only loading, the model card and push_to_hub offline."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import duodiff.hub
from duodiff import ConfigError, DuoDiffusion
from duodiff.hub import ModelLoadError, model_card
from duodiff.keys import COMPONENTS
from tests.conftest import fill_hf_cache, make_tiny, offline_env, run_python

STEPS = 2


def sample(pipe, **kw):
    return pipe.sample(2, seed=3, num_inference_steps=STEPS, progress=False, **kw)


def assert_same_weights(a: DuoDiffusion, b: DuoDiffusion) -> None:
    for name in COMPONENTS:
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{name}.{k} differs"


# ------------------------------------------------------------------ round trips
def test_round_trip_is_bit_identical(tmp_path):
    pipe = make_tiny(3, seed=1)  # from_preset("tiny", num_classes=3) + randomize_weights
    before = sample(pipe)
    pipe.save_pretrained(tmp_path / "m")
    loaded = DuoDiffusion.from_pretrained(tmp_path / "m")
    assert loaded.config == pipe.config
    assert_same_weights(pipe, loaded)
    after = sample(loaded)
    assert torch.equal(before.images, after.images)
    assert torch.equal(before.labels, after.labels)
    # str paths work as well
    assert DuoDiffusion.from_pretrained(str(tmp_path / "m")).config == pipe.config


def test_saved_layout(tiny_model_dir):
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "DuoDiffusion"
    assert index["label_unet"] == ["monai", "DiffusionModelUNet"]
    assert index["image_controlnet"] == ["monai", "ControlNet"]
    assert index["pipeline"]["label_names"] == ["background", "anterior", "posterior"]
    assert index["pipeline"]["spacing"] == [1.5, 0.75, 2.0]
    for name in COMPONENTS:
        assert (tiny_model_dir / name / "config.json").is_file()
        assert (tiny_model_dir / name / "model.safetensors").is_file()
        assert (tiny_model_dir / name / "model.fp16.safetensors").is_file()
    assert (tiny_model_dir / "scheduler" / "scheduler_config.json").is_file()
    assert (tiny_model_dir / "README.md").read_text().startswith("---\nlibrary_name: duodiff")
    # configs are sorted, indented JSON
    text = (tiny_model_dir / "label_unet" / "config.json").read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    # no temporary folders left next to it
    assert [p.name for p in tiny_model_dir.parent.iterdir()] == ["tiny"]


def test_fp16_variant_round_trip(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "half", variant="fp16")
    assert not (tmp_path / "half" / "label_unet" / "model.safetensors").exists()
    raw = load_file(str(tmp_path / "half" / "label_unet" / "model.fp16.safetensors"))
    assert all(v.dtype == torch.float16 for v in raw.values() if v.is_floating_point())
    loaded = DuoDiffusion.from_pretrained(tmp_path / "half", variant="fp16")
    assert loaded.dtype == torch.float32  # upcast into the fp32 networks the config builds
    for name in COMPONENTS:
        ref = getattr(tiny_pipe, name).state_dict()
        for k, v in getattr(loaded, name).state_dict().items():
            expected = ref[k].half().float() if ref[k].is_floating_point() else ref[k]
            assert torch.equal(v, expected), f"{name}.{k}"
    a, b = sample(tiny_pipe), sample(loaded)
    assert float((a.images - b.images).abs().mean()) < 0.02
    assert float((a.labels == b.labels).float().mean()) > 0.95
    # a folder holding only the fp16 variant loads without naming it, and says which weights it loaded
    with pytest.warns(UserWarning, match=r"holds only fp16 weights \(model.fp16.safetensors\)"):
        implicit = DuoDiffusion.from_pretrained(tmp_path / "half")
    assert_same_weights(loaded, implicit)
    # ... from an offline Hub cache too
    fill_hf_cache(tmp_path / "half", tmp_path / "hf", "org/half")
    with pytest.warns(UserWarning, match="holds only fp16 weights"):
        hub = DuoDiffusion.from_pretrained("org/half", cache_dir=tmp_path / "hf", local_files_only=True)
    assert_same_weights(loaded, hub)
    # a folder missing some components' weights still names the fix
    (tmp_path / "half" / "label_unet" / "model.fp16.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="variant="):
        DuoDiffusion.from_pretrained(tmp_path / "half")


def test_both_variants_in_one_folder(tiny_pipe, tiny_model_dir):
    full = DuoDiffusion.from_pretrained(tiny_model_dir)
    half = DuoDiffusion.from_pretrained(tiny_model_dir, variant="fp16")
    assert_same_weights(tiny_pipe, full)
    w = tiny_pipe.label_unet.out[2].conv.weight
    assert torch.equal(half.label_unet.out[2].conv.weight, w.half().float())


def test_saving_another_model_drops_stale_variants(tmp_path):
    a, b = make_tiny(3, seed=0), make_tiny(3, seed=1)
    target = tmp_path / "m"
    a.save_pretrained(target)
    a.save_pretrained(target, variant="fp16")
    a.save_pretrained(target)  # same model again: its fp16 weights stay
    assert (target / "label_unet" / "model.fp16.safetensors").is_file()
    b.save_pretrained(target)  # another model: A's fp16 weights must not survive next to B's config
    for name in COMPONENTS:
        assert not (target / name / "model.fp16.safetensors").exists()
    with pytest.raises(FileNotFoundError, match="variant="):
        DuoDiffusion.from_pretrained(target, variant="fp16")
    assert_same_weights(b, DuoDiffusion.from_pretrained(target))


def test_from_pretrained_dtype_and_device(tiny_model_dir):
    pipe = DuoDiffusion.from_pretrained(tiny_model_dir, dtype="bfloat16", device="cpu")
    assert pipe.dtype == torch.bfloat16 and pipe.device == torch.device("cpu")
    out = pipe.sample(1, seed=0, num_inference_steps=STEPS, progress=False)
    assert out.images.dtype == torch.float32


def test_invalid_variant(tiny_model_dir):
    with pytest.raises(ValueError, match=r"variant must be one of \[None, 'fp16'\], got 'bf16'"):
        DuoDiffusion.from_pretrained(tiny_model_dir, variant="bf16")
    with pytest.raises(ValueError, match="variant"):
        make_tiny(3).save_pretrained(tiny_model_dir.parent / "never", variant="int8")
    assert not (tiny_model_dir.parent / "never").exists()


# ------------------------------------------------------------------ Hugging Face cache, offline
def test_offline_hf_cache_in_process(tiny_pipe, tiny_model_dir, tmp_path):
    cache = tmp_path / "hf"
    fill_hf_cache(tiny_model_dir, cache, "org/name")
    loaded = DuoDiffusion.from_pretrained("org/name", cache_dir=cache, local_files_only=True)
    assert_same_weights(tiny_pipe, loaded)
    assert torch.equal(sample(loaded).images, sample(tiny_pipe).images)
    half = DuoDiffusion.from_pretrained("org/name", cache_dir=cache, local_files_only=True, variant="fp16")
    assert half.config == tiny_pipe.config


def test_offline_hf_cache_revision(tiny_pipe, tiny_model_dir, tmp_path):
    cache = tmp_path / "hf"
    fill_hf_cache(tiny_model_dir, cache, "org/name", ref="v1")
    loaded = DuoDiffusion.from_pretrained("org/name", revision="v1", cache_dir=cache, local_files_only=True)
    assert loaded.config == tiny_pipe.config
    with pytest.raises(FileNotFoundError, match="revision main"):
        DuoDiffusion.from_pretrained("org/name", cache_dir=cache, local_files_only=True)


def test_missing_repo_offline_in_process(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        DuoDiffusion.from_pretrained("org/missing", cache_dir=tmp_path / "empty", local_files_only=True)
    msg = str(e.value)
    assert "'org/missing'" in msg and "not in the local Hugging Face cache" in msg


def test_offline_env_var_in_subprocess(tiny_pipe, tiny_model_dir, tmp_path):
    """The real HF_HUB_OFFLINE=1 code path: the variable is read when huggingface_hub is imported."""
    cache = tmp_path / "hf"
    fill_hf_cache(tiny_model_dir, cache, "org/name")
    weights = tmp_path / "weights.safetensors"
    code = textwrap.dedent(f"""
        import huggingface_hub.constants as c
        assert c.HF_HUB_OFFLINE, "HF_HUB_OFFLINE was not picked up"
        from safetensors.torch import save_file
        from duodiff import DuoDiffusion
        pipe = DuoDiffusion.from_pretrained("org/name", cache_dir={str(cache)!r})
        state = {{f"{{n}}/{{k}}": v for n, m in pipe.components().items() for k, v in m.state_dict().items()}}
        save_file(state, {str(weights)!r})
        out = pipe.sample(1, seed=0, num_inference_steps=2, progress=False)
        print("SHAPE", tuple(out.images.shape))
        try:
            DuoDiffusion.from_pretrained("org/missing", cache_dir={str(cache)!r})
        except FileNotFoundError as e:
            print("MISSING", e)
    """)
    proc = run_python(code, env=offline_env(HF_HUB_CACHE=str(tmp_path / "unused")))
    assert proc.returncode == 0, proc.stderr
    assert "SHAPE (1, 1, 16, 16, 16)" in proc.stdout
    assert "MISSING Model 'org/missing'" in proc.stdout and "not in the local Hugging Face cache" in proc.stdout
    state = load_file(str(weights))
    for name in COMPONENTS:
        for k, v in getattr(tiny_pipe, name).state_dict().items():
            assert torch.equal(state[f"{name}/{k}"], v)


def test_snapshot_only_fetches_needed_files():
    patterns = duodiff.hub._allow_patterns(None)
    assert "model_index.json" in patterns and "label_unet/model.safetensors" in patterns
    assert not any("fp16" in p for p in patterns)
    assert "image_controlnet/model.fp16.safetensors" in duodiff.hub._allow_patterns("fp16")


# ------------------------------------------------------------------ local path errors
def test_missing_local_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="No model folder at"):
        DuoDiffusion.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="No model folder at"):
        DuoDiffusion.from_pretrained("./nope/there")


def test_folder_without_model_index(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No 'model_index.json'"):
        DuoDiffusion.from_pretrained(tmp_path / "empty")


def test_saved_model_has_the_permissions_of_any_new_file(tiny_pipe, tmp_path):
    """save_pretrained builds the folder in a private temporary folder: the result must not stay 0700 / 0600, or
    the other users of a shared machine cannot load the model."""
    import os
    import stat

    mask = os.umask(0o022)
    os.umask(mask)
    out = tmp_path / "shared" / "model"
    tiny_pipe.save_pretrained(out)
    dirs = [out, *(p for p in out.rglob("*") if p.is_dir())]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask for p in files), \
        sorted({oct(p.stat().st_mode) for p in files})
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o777 & ~mask for p in dirs)


def test_model_index_of_another_library(tiny_model_dir, tmp_path):
    broken = tmp_path / "m"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ConfigError, match="does not describe a DuoDiffusion pipeline"):
        DuoDiffusion.from_pretrained(broken)
    (broken / "model_index.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        DuoDiffusion.from_pretrained(broken)


def test_missing_component_folder(tiny_model_dir, tmp_path):
    broken = tmp_path / "m"
    shutil.copytree(tiny_model_dir, broken)
    shutil.rmtree(broken / "image_unet")
    with pytest.raises(FileNotFoundError, match="image_unet"):
        DuoDiffusion.from_pretrained(broken)


def test_save_over_a_file_is_refused(tiny_pipe, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        tiny_pipe.save_pretrained(target)
    assert target.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# ------------------------------------------------------------------ atomic saves
def _failing_save_file(monkeypatch, after: int):
    real = duodiff.hub.save_file
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        if calls["n"] >= after:
            raise OSError(28, "No space left on device")
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(duodiff.hub, "save_file", flaky)
    return calls


def test_failed_save_keeps_the_old_model(tiny_pipe, tmp_path, monkeypatch):
    target = tmp_path / "model"
    tiny_pipe.save_pretrained(target)
    other = make_tiny(3, seed=9, spacing=(1.5, 0.75, 2.0), label_names=("background", "anterior", "posterior"))
    calls = _failing_save_file(monkeypatch, after=1)
    with pytest.raises(OSError, match="No space left"):
        other.save_pretrained(target)
    assert calls["n"] == 1  # it really failed half-way, after the first component
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp / backup folders
    assert_same_weights(tiny_pipe, DuoDiffusion.from_pretrained(target))
    monkeypatch.undo()
    other.save_pretrained(target)  # a later good save replaces it
    assert_same_weights(other, DuoDiffusion.from_pretrained(target))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_failed_first_save_leaves_nothing(tiny_pipe, tmp_path, monkeypatch):
    _failing_save_file(monkeypatch, after=2)
    with pytest.raises(OSError):
        tiny_pipe.save_pretrained(tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ strict, safetensors-only loading
@pytest.fixture()
def broken_copy(tiny_model_dir, tmp_path) -> Path:
    path = tmp_path / "m"
    shutil.copytree(tiny_model_dir, path)
    return path


def _edit_weights(folder: Path, component: str, edit) -> None:
    file = folder / component / "model.safetensors"
    state = load_file(str(file))
    edit(state)
    save_file(state, str(file))


def test_missing_key_is_an_error(broken_copy):
    _edit_weights(broken_copy, "label_unet", lambda s: s.pop("out.2.conv.weight"))
    with pytest.raises(ModelLoadError) as e:
        DuoDiffusion.from_pretrained(broken_copy)
    assert "label_unet" in str(e.value) and "1 missing key(s) ['out.2.conv.weight']" in str(e.value)


def test_unexpected_key_is_an_error(broken_copy):
    _edit_weights(broken_copy, "image_controlnet", lambda s: s.update(extra=torch.zeros(2)))
    with pytest.raises(ModelLoadError, match=r"1 unexpected key\(s\) \['extra'\]"):
        DuoDiffusion.from_pretrained(broken_copy)


def test_wrong_shape_is_an_error(broken_copy):
    def grow(s):
        s["out.2.conv.bias"] = torch.zeros(s["out.2.conv.bias"].shape[0] + 1)

    _edit_weights(broken_copy, "image_unet", grow)
    with pytest.raises(ModelLoadError, match=r"'out.2.conv.bias' is \(4,\) but the config builds \(3,\)"):
        DuoDiffusion.from_pretrained(broken_copy)


def test_config_not_matching_weights_is_an_error(broken_copy):
    cfg = json.loads((broken_copy / "image_autoencoder" / "config.json").read_text())
    cfg["latent_channels"] = 4
    (broken_copy / "image_autoencoder" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="latent_channels"):  # caught by PipelineConfig validation first
        DuoDiffusion.from_pretrained(broken_copy)


def test_nan_weights_are_an_error(broken_copy):
    def poison(s):
        s["out.2.conv.bias"] = torch.full_like(s["out.2.conv.bias"], float("nan"))

    _edit_weights(broken_copy, "label_unet", poison)
    with pytest.raises(ModelLoadError, match="NaN or Inf"):
        DuoDiffusion.from_pretrained(broken_copy)


@pytest.mark.parametrize("content", ["pickle", "garbage", "truncated", "empty"])
def test_non_safetensors_file_is_rejected(broken_copy, content):
    file = broken_copy / "label_autoencoder" / "model.safetensors"
    if content == "pickle":
        torch.save(DuoDiffusion.from_pretrained(broken_copy).label_autoencoder.state_dict(), file)
    elif content == "garbage":
        file.write_bytes(b"\x80\x04this is not safetensors" * 10)
    elif content == "truncated":
        file.write_bytes(file.read_bytes()[:1000])
    else:
        file.write_bytes(b"")
    with pytest.raises(ModelLoadError) as e:
        DuoDiffusion.from_pretrained(broken_copy)
    assert "not a valid safetensors file" in str(e.value) and "never loads pickles" in str(e.value)


def test_model_load_error_is_a_value_error():
    assert issubclass(ModelLoadError, ValueError)


# ------------------------------------------------------------------ model card and push
def test_model_card_metadata(tiny_pipe):
    card = model_card(tiny_pipe, license="cc-by-sa-4.0")
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "duodiff"
    assert front["license"] == "cc-by-sa-4.0"
    assert {"duodiff", "medical-imaging", "diffusion", "controlnet", "3d", "segmentation"} <= set(front["tags"])
    assert front["label_names"] == ["background", "anterior", "posterior"]
    assert front["volume_shape"] == [16, 16, 16]
    assert front["spacing_mm"] == [1.5, 0.75, 2.0]
    assert front["image_channels"] == 1
    body = card.split("---\n", 2)[2]
    assert "DuoDiffusion.from_pretrained" in body and "1: anterior" in body
    assert "| image_controlnet parameters |" in body


def test_model_card_is_valid_for_huggingface_hub(tiny_pipe):
    from huggingface_hub import ModelCard

    card = ModelCard(model_card(tiny_pipe, license="apache-2.0"))
    assert card.data.library_name == "duodiff" and card.data.license == "apache-2.0"


def test_push_to_hub_offline_fails_clearly(tmp_path):
    code = textwrap.dedent("""
        import tempfile, os
        from duodiff.testing import tiny_pipeline
        pipe = tiny_pipeline()
        before = set(os.listdir(tempfile.gettempdir()))
        try:
            pipe.push_to_hub("org/name", token="hf_not_a_real_token")
        except ConnectionError as e:
            print("RAISED", type(e).__name__, "|", e)
        else:
            print("NO ERROR")
        print("LEFT", sorted(set(os.listdir(tempfile.gettempdir())) - before))
    """)
    proc = run_python(code, env=offline_env(TMPDIR=str(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    assert "RAISED OfflineModeIsEnabled" in proc.stdout
    assert "HF_HUB_OFFLINE" in proc.stdout  # the message says how to go online
    assert "LEFT []" in proc.stdout  # the temporary save was cleaned up


def test_a_saved_models_card_snippet_runs_as_written(tiny_model_dir):
    """The card save_pretrained writes holds a snippet that runs once its placeholder names the folder."""
    card = (tiny_model_dir / "README.md").read_text()
    start = card.index("```python\n") + len("```python\n")
    snippet = card[start:card.index("```", start)]
    assert '"<this repo or folder>"' in snippet
    scope: dict = {}
    exec(snippet.replace('"<this repo or folder>"', repr(str(tiny_model_dir))), scope)
    assert scope["out"].images.shape[0] == 4 and scope["out"].labels.shape[0] == 4

"""Config validation: every bad architecture fails up front with a message naming the value and the fix."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from duodiff import ConfigError, ControlNetConfig, PipelineConfig
from duodiff.presets import make_config


def tiny_dict(**changes) -> dict:
    d = make_config("tiny", num_classes=3).to_dict()
    d.update(changes)
    return d


# ------------------------------------------------------------------ round trip
def test_to_dict_from_dict_round_trip_is_exact_and_json_safe():
    cfg = make_config("hippocampus", num_classes=3, spacing=(1.0, 0.5, 2.0), label_names=("bg", "a", "p"),
                      image_channels=2, prediction_type="v_prediction")
    d = cfg.to_dict()
    text = json.dumps(d, sort_keys=True)  # no tuples / dataclasses left
    back = PipelineConfig.from_dict(json.loads(text))
    assert back == cfg
    assert back.to_dict() == d
    assert isinstance(back.volume_shape, tuple) and isinstance(back.label_autoencoder.channels, tuple)
    assert isinstance(back.image_controlnet, ControlNetConfig)
    assert back.scheduler.prediction_type == "v_prediction"
    assert back.spacing == (1.0, 0.5, 2.0)


def test_configs_are_frozen():
    cfg = make_config("tiny", num_classes=3)
    with pytest.raises(AttributeError):
        cfg.num_classes = 4  # type: ignore[misc]


def test_int_spacing_from_json_is_coerced_to_float():
    cfg = PipelineConfig.from_dict(tiny_dict(spacing=[1, 2, 3]))
    assert cfg.spacing == (1.0, 2.0, 3.0) and all(isinstance(s, float) for s in cfg.spacing)


def test_default_label_names_background_first():
    cfg = make_config("tiny", num_classes=4)
    assert cfg.label_names == ("background", "class_1", "class_2", "class_3")


def test_latent_shapes():
    cfg = make_config("tiny", num_classes=3, volume_shape=(16, 32, 24))
    assert cfg.label_latent_shape == (3, 8, 16, 12)
    assert cfg.image_latent_shape == (3, 8, 16, 12)


def test_replace_revalidates():
    cfg = make_config("tiny", num_classes=3)
    assert cfg.replace(spacing=(2.0, 2.0, 2.0)).spacing == (2.0, 2.0, 2.0)
    with pytest.raises(ConfigError, match="spacing"):
        cfg.replace(spacing=(1.0, 0.0, 1.0))


# ------------------------------------------------------------------ shapes
def test_shape_not_divisible_suggests_a_valid_shape():
    with pytest.raises(ConfigError) as e:
        make_config("hippocampus", num_classes=3, volume_shape=(30, 48, 32))
    msg = str(e.value)
    assert "(30, 48, 32)" in msg and "divisible by 4" in msg and "silently crop" in msg
    assert "(28, 48, 32)" in msg or "(32, 48, 32)" in msg  # a concrete valid shape
    # the suggestion really is valid
    suggested = msg.split("e.g. ")[1].split(")")[0] + ")"
    make_config("hippocampus", num_classes=3, volume_shape=tuple(json.loads(suggested.replace("(", "[")
                                                                                    .replace(")", "]"))))


def test_latent_not_divisible_by_unet_levels():
    # tiny: autoencoder /2, unet /2 -> sides must be multiples of 4
    with pytest.raises(ConfigError, match=r"latent shape .* multiples of 4"):
        make_config("tiny", num_classes=3, volume_shape=(16, 18, 16))


def test_volume_shape_needs_three_sides():
    with pytest.raises(ConfigError, match="3 sides"):
        make_config("tiny", num_classes=3, volume_shape=(16, 16))


def test_nonpositive_volume_shape():
    with pytest.raises(ConfigError, match="volume_shape must be positive"):
        PipelineConfig.from_dict(tiny_dict(volume_shape=[16, 0, 16]))


# ------------------------------------------------------------------ channels / groups
def test_label_autoencoder_channels_must_equal_num_classes():
    d = tiny_dict(num_classes=4)
    with pytest.raises(ConfigError, match="num_classes=4"):
        PipelineConfig.from_dict(d)


def test_unet_in_channels_must_match_latent_channels():
    d = tiny_dict()
    d["image_unet"] = dict(d["image_unet"], in_channels=4, out_channels=4)
    with pytest.raises(ConfigError, match=r"image_unet.in_channels must equal image_autoencoder.latent_channels=3"):
        PipelineConfig.from_dict(d)


def test_controlnet_must_mirror_unet():
    d = tiny_dict()
    d["image_controlnet"] = dict(d["image_controlnet"], channels=[16, 32], norm_num_groups=4)
    with pytest.raises(ConfigError) as e:
        PipelineConfig.from_dict(d)
    assert "image_controlnet.channels=(16, 32) must match image_unet.channels=(8, 16)" in str(e.value)


def test_controlnet_condition_downsampling_must_match_autoencoder():
    d = tiny_dict()
    d["image_controlnet"] = dict(d["image_controlnet"], conditioning_embedding_num_channels=[8, 16, 16])
    with pytest.raises(ConfigError, match=r"downsamples the label condition by 4.*Give it 2 entries"):
        PipelineConfig.from_dict(d)


def test_controlnet_condition_channels_must_equal_num_classes():
    d = tiny_dict()
    d["image_controlnet"] = dict(d["image_controlnet"], conditioning_embedding_in_channels=1)
    with pytest.raises(ConfigError, match="conditioning_embedding_in_channels must equal num_classes=3"):
        PipelineConfig.from_dict(d)


def test_image_autoencoder_must_match_image_channels():
    d = tiny_dict(image_channels=2)
    with pytest.raises(ConfigError, match="image_channels=2"):
        PipelineConfig.from_dict(d)


# ------------------------------------------------------------------ metadata
@pytest.mark.parametrize("names", [("bg", "a"), ("bg", "a", "b", "c")])
def test_label_names_length(names):
    with pytest.raises(ConfigError) as e:
        make_config("tiny", num_classes=3, label_names=names)
    assert "num_classes=3" in str(e.value) and f"got {len(names)}" in str(e.value)


def test_label_names_unique():
    with pytest.raises(ConfigError, match="unique"):
        make_config("tiny", num_classes=3, label_names=("bg", "a", "a"))


def test_num_classes_at_least_two():
    with pytest.raises(ConfigError, match="num_classes must be >= 2"):
        make_config("tiny", num_classes=1)


@pytest.mark.parametrize("spacing", [(1.0, -1.0, 1.0), (1.0, float("nan"), 1.0), (0.0, 1.0, 1.0)])
def test_spacing_must_be_positive_finite(spacing):
    with pytest.raises(ConfigError, match="spacing"):
        make_config("tiny", num_classes=3, spacing=spacing)


@pytest.mark.parametrize("field", ["label_scale_factor", "image_scale_factor"])
def test_scale_factor_positive(field):
    with pytest.raises(ConfigError, match=field):
        PipelineConfig.from_dict(tiny_dict(**{field: 0.0}))


# ------------------------------------------------------------------ dict input
def test_unknown_keys_are_named_with_the_allowed_ones():
    with pytest.raises(ConfigError) as e:
        PipelineConfig.from_dict(tiny_dict(volume_shap=[16, 16, 16]))
    assert "'volume_shap'" in str(e.value) and "'volume_shape'" in str(e.value)
    d = tiny_dict()
    d["label_unet"] = dict(d["label_unet"], chanels=[8, 16])
    with pytest.raises(ConfigError, match="chanels.*UNetConfig"):
        PipelineConfig.from_dict(d)


def test_missing_required_key():
    d = tiny_dict()
    del d["num_classes"]
    with pytest.raises(ConfigError, match=r"Missing required key\(s\) \['num_classes'\]"):
        PipelineConfig.from_dict(d)


@pytest.mark.parametrize(
    "changes, fragment",
    [
        (dict(num_classes="3"), "num_classes must be int, got '3'"),
        (dict(num_classes=True), "num_classes must be int, got True"),
        (dict(num_classes=3.0), "num_classes must be int, got 3.0"),
        (dict(volume_shape=[16, 16]), "volume_shape must be a sequence of 3 values"),
        (dict(spacing="1mm"), "spacing must be a sequence of 3 values"),
        (dict(label_names=["bg", 1, "b"]), "label_names must be a sequence of str"),
    ],
)
def test_wrong_types_raise_type_error(changes, fragment):
    with pytest.raises(TypeError) as e:
        PipelineConfig.from_dict(tiny_dict(**changes))
    assert fragment in str(e.value)


def test_from_dict_needs_a_mapping():
    with pytest.raises(TypeError, match="must be a mapping"):
        PipelineConfig.from_dict([("num_classes", 3)])  # type: ignore[arg-type]


# ------------------------------------------------------------------ validation matches what MONAI can do
@settings(max_examples=12, deadline=None, derandomize=True)
@given(shape=st.tuples(*[st.integers(min_value=4, max_value=20)] * 3))
def test_accepted_shapes_run_and_rejected_shapes_would_break(shape):
    """Every shape the config accepts goes through the MONAI networks unchanged; every other shape is
    one MONAI would crop (autoencoder) or fail on (UNet), and is rejected up front."""
    import torch

    from duodiff.models import build_autoencoder, build_unet

    try:
        cfg = make_config("tiny", num_classes=2, volume_shape=shape)
    except ConfigError as e:
        assert str(shape) in str(e) and "multiples of" in str(e)
        assert any(s % 4 for s in shape)
        return
    assert all(s % 4 == 0 for s in shape)
    ae, unet = build_autoencoder(cfg.label_autoencoder), build_unet(cfg.label_unet)
    with torch.inference_mode():
        x = torch.zeros(1, 2, *shape)
        z = ae.encode_stage_2_inputs(x)
        assert tuple(z.shape[1:]) == cfg.label_latent_shape
        assert tuple(ae.decode_stage_2_outputs(z).shape[2:]) == shape
        assert unet(z, timesteps=torch.zeros(1, dtype=torch.long)).shape == z.shape

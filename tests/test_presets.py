"""Presets build valid configs and real MONAI networks of the documented sizes."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import AutoencoderKL, ControlNet, DiffusionModelUNet

from duodiff import PRESETS, ConfigError, DuoDiffusion, make_config
from duodiff.keys import COMPONENTS
from duodiff.models import count_parameters


@pytest.mark.parametrize(
    "name, shape, factor",
    [("tiny", (16, 16, 16), 2), ("hippocampus", (32, 48, 32), 4), ("paper", (160, 160, 64), 4)],
)
def test_preset_configs(name, shape, factor):
    cfg = make_config(name, num_classes=3)
    assert cfg.volume_shape == shape
    assert cfg.label_autoencoder.downsample_factor == factor
    assert cfg.image_autoencoder.downsample_factor == factor
    assert cfg.label_latent_shape[1:] == tuple(s // factor for s in shape)
    assert cfg.image_controlnet.condition_downsample_factor == factor
    assert cfg.label_autoencoder.in_channels == 3 and cfg.image_autoencoder.in_channels == 1


def test_presets_listed():
    assert set(PRESETS) == {"tiny", "hippocampus", "paper"}


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError) as e:
        DuoDiffusion.from_preset("huge", num_classes=3)
    assert "'huge'" in str(e.value) and "'tiny'" in str(e.value) and "'paper'" in str(e.value)


def test_tiny_builds_real_monai_networks():
    pipe = DuoDiffusion.from_preset("tiny", num_classes=3)
    assert isinstance(pipe.label_autoencoder, AutoencoderKL)
    assert isinstance(pipe.image_autoencoder, AutoencoderKL)
    assert isinstance(pipe.label_unet, DiffusionModelUNet)
    assert isinstance(pipe.image_unet, DiffusionModelUNet)
    assert isinstance(pipe.image_controlnet, ControlNet)
    assert list(pipe.components()) == list(COMPONENTS)
    assert all(not m.training for m in pipe.modules())
    assert pipe.device == torch.device("cpu") and pipe.dtype == torch.float32
    # small enough for tests: well under a million parameters in total
    assert sum(count_parameters(m) for m in pipe.modules()) < 1_000_000


def test_init_seed_makes_weights_reproducible_without_touching_global_rng():
    state = torch.random.get_rng_state()
    a = DuoDiffusion.from_preset("tiny", num_classes=3, init_seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG restored
    b = DuoDiffusion.from_preset("tiny", num_classes=3, init_seed=1)
    c = DuoDiffusion.from_preset("tiny", num_classes=3, init_seed=2)
    wa, wb, wc = (p.label_autoencoder.encoder.blocks[0].conv.weight for p in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)


def test_preset_options_reach_the_config():
    pipe = DuoDiffusion.from_preset("tiny", num_classes=4, volume_shape=(16, 24, 32), spacing=(0.5, 0.5, 3),
                                    label_names=["bg", "a", "b", "c"], image_channels=2,
                                    prediction_type="v_prediction")
    c = pipe.config
    assert c.volume_shape == (16, 24, 32) and c.spacing == (0.5, 0.5, 3.0)
    assert c.label_names == ("bg", "a", "b", "c") and c.image_channels == 2
    assert c.scheduler.prediction_type == "v_prediction"
    assert pipe.image_autoencoder.encoder.blocks[0].conv.in_channels == 2
    assert pipe.image_controlnet.controlnet_cond_embedding.conv_in.conv.in_channels == 4


def test_hippocampus_preset_samples_its_shape():
    pipe = DuoDiffusion.from_preset("hippocampus", num_classes=3)
    out = pipe.sample(1, seed=0, num_inference_steps=1, progress=False)
    assert out.images.shape == (1, 1, 32, 48, 32)
    assert out.labels.shape == (1, 1, 32, 48, 32)


def test_paper_preset_is_close_to_the_ldm_recipe():
    cfg = make_config("paper", num_classes=2)
    assert cfg.image_autoencoder.channels == (32, 64, 64)
    assert cfg.image_unet.channels == (64, 128, 256)
    assert cfg.image_latent_shape == (3, 40, 40, 16)


def test_overrides_change_a_component_and_what_follows_from_it():
    """A 2x image latent: the image UNet and ControlNet follow its channels, the ControlNet embedding its levels."""
    cfg = make_config("hippocampus", num_classes=3, overrides={
        "image_autoencoder": {"channels": [32, 64], "num_res_blocks": [1, 1], "attention_levels": [False, False],
                              "latent_channels": 4},
        "image_unet": {"channels": [16, 32, 64, 64], "num_res_blocks": [1, 1, 1, 1],
                       "attention_levels": [False, False, True, True]},
    })
    assert cfg.image_autoencoder.downsample_factor == 2 and cfg.image_latent_shape == (4, 16, 24, 16)
    assert cfg.image_unet.in_channels == cfg.image_unet.out_channels == 4
    assert cfg.image_controlnet.channels == (16, 32, 64, 64) and cfg.image_controlnet.in_channels == 4
    assert len(cfg.image_controlnet.conditioning_embedding_num_channels) == 2
    assert cfg.label_autoencoder == make_config("hippocampus", num_classes=3).label_autoencoder  # untouched
    pipe = DuoDiffusion.from_config(cfg.replace(volume_shape=(16, 16, 16)), init_seed=0)
    x = torch.randn(1, 4, 8, 8, 8)
    y = torch.zeros(1, 3, 16, 16, 16)
    down, mid = pipe.image_controlnet(x=x, timesteps=torch.tensor([1]), controlnet_cond=y)
    out = pipe.image_unet(x=x, timesteps=torch.tensor([1]), down_block_additional_residuals=down,
                          mid_block_additional_residual=mid)
    assert out.shape == x.shape


@pytest.mark.parametrize(("overrides", "match"), [
    ({"controlnet": {"channels": [8, 16]}}, "Cannot override component 'controlnet'"),
    ({"image_unet": {"in_channels": 8}}, r"\['in_channels'\] are derived"),
])
def test_bad_overrides_are_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        make_config("tiny", num_classes=2, overrides=overrides)


def test_overrides_are_unchanged_presets_when_empty():
    for name in PRESETS:
        assert make_config(name, num_classes=3, overrides={}) == make_config(name, num_classes=3)

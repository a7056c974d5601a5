"""Presets build valid configs and real MONAI networks of the documented sizes."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import AutoencoderKL, ControlNet, DiffusionModelUNet

from duodiff import PRESETS, ConfigError, DuoDiffusion, make_config
from duodiff.keys import COMPONENTS
from duodiff.models import count_parameters


@pytest.mark.parametrize(
    "name, shape, label_factor, image_factor",
    [("tiny", (16, 16, 16), 2, 2), ("hippocampus", (32, 48, 32), 4, 2), ("paper", (160, 160, 64), 4, 4)],
)
def test_preset_configs(name, shape, label_factor, image_factor):
    cfg = make_config(name, num_classes=3)
    assert cfg.volume_shape == shape
    assert cfg.label_autoencoder.downsample_factor == label_factor
    assert cfg.image_autoencoder.downsample_factor == image_factor
    assert cfg.label_latent_shape[1:] == tuple(s // label_factor for s in shape)
    assert cfg.image_latent_shape[1:] == tuple(s // image_factor for s in shape)
    assert cfg.image_controlnet.condition_downsample_factor == image_factor
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
    assert cfg.image_latent_shape == (8, 40, 40, 16)  # the recipe's 8 latent channels, at 4x to keep it small
    assert cfg.schedule_of("image").prediction_type == "v_prediction"


def test_a_model_saved_before_a_preset_change_keeps_its_architecture(tmp_path):
    """A model saved with the image side the hippocampus preset had before issue 12 (4x, 3 latent channels, 3-level
    UNet, epsilon) loads as it was saved: saved models carry their whole configuration, not a preset name."""
    old_image_side = {
        "image_autoencoder": {"channels": [16, 32, 32], "num_res_blocks": [1, 1, 1],
                              "attention_levels": [False, False, False], "latent_channels": 3},
        "image_unet": {"channels": [32, 64, 64], "num_res_blocks": [1, 1, 1], "attention_levels": [False, True, True]},
    }
    cfg = make_config("hippocampus", num_classes=3, volume_shape=(16, 16, 16), overrides=old_image_side,
                      image_prediction_type="epsilon")
    assert cfg.image_scheduler is None
    DuoDiffusion.from_config(cfg, init_seed=0).save_pretrained(tmp_path / "old")
    loaded = DuoDiffusion.from_pretrained(tmp_path / "old")
    assert loaded.config == cfg
    assert loaded.config != make_config("hippocampus", num_classes=3, volume_shape=(16, 16, 16))
    assert loaded.config.image_latent_shape == (3, 4, 4, 4)
    assert loaded.config.schedule_of("image").prediction_type == "epsilon"


def test_hippocampus_preset_is_the_fidelity_recipe():
    """The issue-12 winner: 2x / 8-channel image latent, 4-level image UNet, v-prediction image side; the label side
    keeps ``prediction_type``; ``tiny`` keeps one schedule."""
    cfg = make_config("hippocampus", num_classes=3)
    assert cfg.image_latent_shape == (8, 16, 24, 16)
    assert cfg.image_unet.channels == (16, 32, 64, 64)
    assert cfg.image_controlnet.conditioning_embedding_num_channels == (16, 32)
    assert cfg.schedule_of("image").prediction_type == "v_prediction"
    assert cfg.schedule_of("label").prediction_type == "epsilon"
    assert make_config("tiny", num_classes=3).image_scheduler is None
    same = make_config("hippocampus", num_classes=3, prediction_type="v_prediction")
    assert same.image_scheduler is None and same.schedule_of("image").prediction_type == "v_prediction"
    with pytest.raises(ConfigError, match="prediction_type"):
        make_config("hippocampus", num_classes=3, image_prediction_type="sample_x0")

"""Component configs (autoencoder, UNet, scheduler) validate their own arguments."""

from __future__ import annotations

import pytest

from duodiff import AutoencoderConfig, ConfigError, SchedulerConfig, UNetConfig


# ------------------------------------------------------------------ channels / groups
def test_norm_groups_must_divide_channels():
    with pytest.raises(ConfigError) as e:
        AutoencoderConfig(in_channels=3, out_channels=3, channels=(12, 24), num_res_blocks=(1, 1),
                          attention_levels=(False, False), norm_num_groups=8)
    msg = str(e.value)
    assert "norm_num_groups=8" in msg and "[12] are not divisible" in msg and "(12, 24)" in msg and "e.g. 12" in msg


def test_unet_norm_groups_and_head_channels():
    with pytest.raises(ConfigError, match="norm_num_groups=32"):
        UNetConfig(in_channels=3, out_channels=3, channels=(16, 32), num_res_blocks=(1, 1),
                   attention_levels=(False, True), norm_num_groups=32)
    with pytest.raises(ConfigError, match="num_head_channels=12"):
        UNetConfig(in_channels=3, out_channels=3, channels=(16, 32), num_res_blocks=(1, 1),
                   attention_levels=(False, True), norm_num_groups=8, num_head_channels=12)


def test_per_level_lengths_must_match():
    with pytest.raises(ConfigError, match=r"num_res_blocks must have one entry per level \(2"):
        AutoencoderConfig(in_channels=3, out_channels=3, channels=(8, 16), num_res_blocks=(1, 1, 1),
                          attention_levels=(False, False), norm_num_groups=4)


def test_conditioning_needs_cross_attention_dim():
    with pytest.raises(ConfigError, match="cross_attention_dim"):
        UNetConfig(in_channels=3, out_channels=3, channels=(8, 16), num_res_blocks=(1, 1),
                   attention_levels=(False, False), norm_num_groups=4, with_conditioning=True)


# ------------------------------------------------------------------ scheduler
@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(num_train_timesteps=0), "num_train_timesteps must be >= 1"),
        (dict(schedule="quadratic"), "schedule must be one of"),
        (dict(prediction_type="noise"), "prediction_type must be one of"),
        (dict(beta_start=0.02, beta_end=0.01), "beta_start < beta_end"),
    ],
)
def test_scheduler_config_validation(kwargs, fragment):
    with pytest.raises(ConfigError) as e:
        SchedulerConfig(**kwargs)
    assert fragment in str(e.value)

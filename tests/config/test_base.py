"""The shared config base: its error types."""

from __future__ import annotations

from duodiff import ConfigError


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)

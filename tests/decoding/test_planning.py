"""Decode plans: tile-size checks and parsing, "auto" (whole volumes unless a budget is given)."""

from __future__ import annotations

import pytest

from duodiff.decoding import check_tile_size, estimate_decode_bytes, parse_tile_size, resolve_tile_size


def test_auto_without_a_budget_on_cpu_decodes_whole_volumes(pipe, latents):
    assert resolve_tile_size(pipe.image_autoencoder, latents.shape, "auto").tile is None


@pytest.mark.parametrize("bad", ["big", 0, -2, (4, 4), (4, 4, 0), 2.5, True])
def test_bad_tile_sizes_are_rejected(bad):
    with pytest.raises(ValueError, match="decode_tile_size"):
        check_tile_size(bad)


@pytest.mark.parametrize("text, expected", [("auto", "auto"), ("None", None), ("24", 24), ("24,24,16", (24, 24, 16))])
def test_parse_tile_size(text, expected):
    assert parse_tile_size(text) == expected


@pytest.mark.parametrize("text", ["big", "0", "4,4", "4,x,4", ""])
def test_parse_tile_size_rejects(text):
    with pytest.raises(ValueError, match="tile[_ ]size"):
        parse_tile_size(text)


def test_auto_plan_depends_only_on_model_and_input(pipe, latents):
    for n in (1, 2, 7):
        plan = resolve_tile_size(pipe.image_autoencoder, (n, *latents.shape[1:]), "auto")
        assert plan.tile is None and plan.volumes_per_call == 1 and plan.describe() == "whole"


def test_explicit_budget_still_plans(pipe, latents):
    """Opting in to a budget (e.g. ``max_memory=available_memory(device)``) keeps the planned strategies."""
    per_volume = estimate_decode_bytes(pipe.image_autoencoder, latents.shape[2:])
    plan = resolve_tile_size(pipe.image_autoencoder, latents.shape, "auto", max_memory=per_volume // 2)
    assert plan.tile is not None and plan.describe().startswith("tiled ")

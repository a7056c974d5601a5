"""Label attributes: volumes and centroids, the context layout, requested volumes in mL and their errors."""

from __future__ import annotations

import math

import pytest
import torch

from duodiff.attributes import (
    attribute_names,
    class_volumes_ml,
    compute_attributes,
    make_context,
    requested_attributes,
)
from tests.test_control import NAMES


def test_compute_attributes_known_volumes_and_centroids():
    lab = torch.zeros(2, 1, 8, 8, 8, dtype=torch.long)
    lab[0, 0, :2, :2, :2] = 1  # 8 voxels of class 1 in the corner
    lab[1, 0, 4:, 4:, 4:] = 2  # 64 voxels of class 2
    vol = compute_attributes(lab, 3, ["volume"])
    assert torch.allclose(vol, torch.log1p(torch.tensor([[8.0, 0.0], [0.0, 64.0]])))
    cen = compute_attributes(lab, 3, ["centroid"])
    assert cen.shape == (2, 6)
    assert torch.allclose(cen[0, :3], torch.full((3,), 0.5 / 7), atol=1e-6)  # mean of coords 0 and 1/7
    assert torch.allclose(cen[0, 3:], torch.full((3,), 0.5))  # absent class -> 0.5
    ml = class_volumes_ml(lab, NAMES, (2.0, 1.0, 1.0))
    assert ml["a"].tolist() == [8 * 2 / 1000, 0.0]


def test_attribute_columns_and_context_layout():
    assert attribute_names(["volume", "centroid"], NAMES)[:3] == ["volume:a", "volume:b", "centroid_x:a"]
    ctx = make_context(torch.tensor([[1.5, -2.0]]), torch.tensor([[1.0, 0.0]]), 8)
    assert ctx.shape == (1, 1, 8)
    assert ctx[0, 0].tolist() == [1.5, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_requested_attributes_units_and_errors():
    values, mask = requested_attributes({"a": 1.5, 2: 0.25}, 2, attributes=["volume"], label_names=NAMES,
                                        spacing=(1.0, 1.0, 1.0))
    assert mask.tolist() == [[1.0, 1.0], [1.0, 1.0]]
    assert math.isclose(float(values[0, 0]), math.log1p(1500.0), rel_tol=1e-6)  # 1.5 mL = 1500 voxels of 1 mm^3
    with pytest.raises(ValueError, match="Unknown class 'c'"):
        requested_attributes({"c": 1.0}, 1, attributes=["volume"], label_names=NAMES, spacing=(1, 1, 1))
    with pytest.raises(ValueError, match="positive volume in mL"):
        requested_attributes({"a": -1.0}, 1, attributes=["volume"], label_names=NAMES, spacing=(1, 1, 1))
    with pytest.raises(ValueError, match="not a foreground class"):
        requested_attributes({0: 1.0}, 1, attributes=["volume"], label_names=NAMES, spacing=(1, 1, 1))
    with pytest.raises(ValueError, match="one mapping per sample"):
        requested_attributes([{"a": 1.0}], 2, attributes=["volume"], label_names=NAMES, spacing=(1, 1, 1))

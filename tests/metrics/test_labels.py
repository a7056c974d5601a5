"""Label statistics on constructed masks: volumes, Wasserstein-1, connected components, class coverage."""

from __future__ import annotations

import builtins

import numpy as np
import pytest
import torch

from duodiff.metrics import class_volumes, component_counts, contains_all_classes, label_statistics, wasserstein_1d


def _blobs() -> np.ndarray:
    """Three 10^3 maps: [one cube of class 1 + two cubes of class 2], [class 1 only, diagonal-touching cubes], empty."""
    lab = np.zeros((3, 10, 10, 10), dtype=np.int64)
    lab[0, 1:4, 1:4, 1:4] = 1
    lab[0, 6:8, 6:8, 6:8] = 2
    lab[0, 6:8, 1:3, 1:3] = 2
    lab[1, 0:2, 0:2, 0:2] = 1
    lab[1, 2:4, 2:4, 2:4] = 1  # touches the first cube only at a corner
    return lab


def test_class_volumes_in_mm3():
    lab = _blobs()
    vols = class_volumes(torch.from_numpy(lab)[:, None], 3, spacing=(1.0, 2.0, 0.5))
    np.testing.assert_allclose(vols, [[27.0, 16.0], [16.0, 0.0], [0.0, 0.0]])


def test_component_counts_on_constructed_masks():
    pytest.importorskip("scipy")
    lab = _blobs()
    np.testing.assert_array_equal(component_counts(lab, 3), [[1, 2], [1, 0], [0, 0]])
    np.testing.assert_array_equal(component_counts(lab, 3, connectivity=1), [[1, 2], [2, 0], [0, 0]])
    with pytest.raises(ValueError, match="connectivity"):
        component_counts(lab, 3, connectivity=4)


def test_contains_all_classes():
    np.testing.assert_array_equal(contains_all_classes(_blobs(), 3), [True, False, False])


def test_wasserstein_known_values():
    a = np.array([1.0, 2.0, 3.0, 10.0])
    assert wasserstein_1d(a, a) == 0.0
    assert wasserstein_1d(a, a + 5.0) == pytest.approx(5.0)
    assert wasserstein_1d([0.0], [1.0, 1.0, 1.0]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="non-empty"):
        wasserstein_1d([], [1.0])


def test_wasserstein_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    u, v = rng.normal(0, 1, 37), rng.normal(0.7, 2, 53)
    assert wasserstein_1d(u, v) == pytest.approx(stats.wasserstein_distance(u, v), rel=1e-12)


def test_label_statistics_identical_and_shifted():
    pytest.importorskip("scipy")
    lab = torch.from_numpy(_blobs())[:, None]
    same = label_statistics(lab, lab.clone(), num_classes=3, label_names=["bg", "a", "b"])
    assert same["classes"]["a"]["wasserstein_mm3"] == 0.0
    assert same["classes"]["b"]["wasserstein_mm3"] == 0.0
    assert same["all_classes_fraction"] == {"real": pytest.approx(1 / 3), "synthetic": pytest.approx(1 / 3)}
    assert same["classes"]["b"]["components"]["real"] == {"mean": pytest.approx(2 / 3), "fraction_single": 0.0,
                                                          "max": 2}
    bigger = lab.clone()
    bigger[:, :, 8:10] = torch.where(bigger[:, :, 8:10] == 0, 1, bigger[:, :, 8:10])  # + a slab of class 1
    shifted = label_statistics(lab, bigger, num_classes=3, label_names=["bg", "a", "b"])
    assert shifted["classes"]["a"]["wasserstein_mm3"] > 100
    assert shifted["classes"]["a"]["wasserstein_relative"] > 1
    with pytest.raises(ValueError, match="label_names"):
        label_statistics(lab, lab, num_classes=3, label_names=["a"])
    with pytest.raises(TypeError, match="integer"):
        class_volumes(lab.float(), 3)


def test_label_statistics_without_scipy_or_skimage(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith(("scipy", "skimage")):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    lab = torch.from_numpy(_blobs())[:, None]
    with pytest.raises(ImportError, match="duodiff\\[metrics\\]"):
        component_counts(lab, 3)
    out = label_statistics(lab, lab, num_classes=3)
    assert out["components_note"].startswith("skipped:")
    assert "components" not in out["classes"]["class_1"]
    assert out["classes"]["class_1"]["wasserstein_mm3"] == 0.0

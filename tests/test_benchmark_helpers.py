"""The small report helpers in benchmarks/: quality comparison table and bootstrap intervals."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _report(dv: float, present: float, order: bool) -> dict:
    return {"volume": {"A": {"relative_difference": dv, "within_20pct": abs(dv) <= 0.2},
                       "B": {"relative_difference": -0.05, "within_20pct": True}},
            "all_classes_present": {"synthetic": present},
            "mean_intensity": {"real": {"A": 0.4, "B": 0.3}, "synthetic": {"A": 0.41, "B": 0.35},
                               "same_order": order}}


def test_compare_quality_table_rows_say_met_or_not():
    cq = _load("compare_quality")
    text = cq.table({"before": _report(0.1, 1.0, True), "after": _report(0.3, 0.5, False)})
    lines = text.strip().splitlines()
    assert len(lines) == 4 and "real 0.400 / 0.300" in lines[0]
    assert lines[2].startswith("| before | +10.0 % / -5.0 % (met) | 100 % | 0.410 / 0.350 | met |")
    assert lines[3].startswith("| after | +30.0 % / -5.0 % (NOT met) | 50 % |") and lines[3].endswith("not met |")


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_more_data():
    bq = _load("bundled_quality")
    rng = np.random.default_rng(0)
    small = bq.bootstrap_mean_ci(rng.normal(1.0, 1.0, 20))
    large = bq.bootstrap_mean_ci(rng.normal(1.0, 1.0, 2000))
    for r in (small, large):
        assert r["ci95"][0] < r["mean"] < r["ci95"][1]
    assert large["ci95"][1] - large["ci95"][0] < 0.3 * (small["ci95"][1] - small["ci95"][0])
    assert 0.9 < large["mean"] < 1.1 and large["ci95"][0] > 0.9
    assert bq.bootstrap_mean_ci(np.array([]))["n"] == 0
    assert bq.bootstrap_mean_ci(np.arange(10.0)) == bq.bootstrap_mean_ci(np.arange(10.0))  # seeded

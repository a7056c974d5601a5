"""The small report helpers in benchmarks/: quality comparison table and bootstrap intervals."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


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


def _sweep_row(sampler: str, steps: int, seconds: float, diff: float, cons: float, fid: float) -> dict:
    return {"sampler": sampler, "steps": steps, "seconds_per_pair": seconds, "label_median_rel_diff": [diff, diff / 2],
            "label_median_max_rel_diff": diff, "label_agreement": 0.99, "consistency": cons, "fid": fid}


def test_sweep_equal_quality_rule_and_report():
    bs = _load("bench_sampling")
    ref = _sweep_row("ddim", 50, 3.0, 0.0, 0.60, 10.0)
    assert bs.equal_quality(_sweep_row("dpmsolver++", 10, 0.7, 0.04, 0.59, 10.9), ref)
    assert not bs.equal_quality(_sweep_row("dpmsolver++", 5, 0.4, 0.06, 0.60, 10.0), ref)  # label medians 6 % off
    assert not bs.equal_quality(_sweep_row("unipc", 5, 0.4, 0.01, 0.57, 10.0), ref)  # consistency 0.03 lower
    assert not bs.equal_quality(_sweep_row("unipc", 5, 0.4, 0.01, 0.60, 11.5), ref)  # FID 15 % higher
    rows = [_sweep_row("dpmsolver++", 10, 0.7, 0.04, 0.59, 10.9), _sweep_row("unipc", 5, 0.4, 0.01, 0.57, 10.0)]
    for r in rows:
        r["equal_quality"] = bs.equal_quality(r, ref)
    sweep = {"dtype": "bfloat16", "num_samples": 32, "batch": 8, "segmenter": "docs/results/evaluate",
             "reference_sampler": "ddim-50", "equal_quality": bs.EQUAL_QUALITY, "fid_reference": "real",
             "reference": {**ref, "steps": 50}, "rows": rows,
             "fastest_equal_quality": {"sampler": "dpmsolver++", "steps": 10, "seconds_per_pair": 0.7,
                                       "speedup_vs_reference": 3.0 / 0.7}}
    text = "\n".join(bs.markdown_sweep(sweep, ["background", "A", "B"]))
    assert "| dpmsolver++ | 10 | 0.70 | 4.0%, 2.0% |" in text and "| unipc | 5 | 0.40 |" in text
    assert "**dpmsolver++-10**, 0.70 s/pair, 4.3x the reference" in text


def test_dtype_table_report_names_auto_and_its_ratio():
    bs = _load("bench_sampling")
    stages = {"label_denoise_s": 1.0, "label_decode_s": 0.1, "image_denoise_s": 2.0, "image_decode_s": 0.1}
    t = {"steps": 50, "repeats": 2, "auto_dtype": "bfloat16", "auto_first_use_s": 3.2, "best_fixed": "bfloat16",
         "auto_vs_best_fixed": 1.02,
         "rows": [{"dtype": "float32", "resolved": "float32", **stages, "latency_s": 3.2},
                  {"dtype": "auto", "resolved": "bfloat16", **stages, "latency_s": 3.1}]}
    text = "\n".join(bs.markdown_dtype_table(t))
    assert "chose **bfloat16**" in text and "**1.02x**" in text and "| auto (bfloat16) | 1.000 |" in text


def _rule_rows(sampler: str, passes: dict[int, bool]) -> list[dict]:
    return [{"sampler": sampler, "steps": k, "seconds_per_pair": k / 50, "equal_quality": ok}
            for k, ok in passes.items()]


def test_default_rule_takes_twice_the_first_stable_step_count_of_a_core_sampler():
    bs = _load("bench_sampling")
    rows = (_rule_rows("ddim", {5: False, 10: True, 15: True, 20: True, 30: True, 50: True})
            # a lucky 5-step row followed by failures is not stable; diffusers samplers are not core
            + _rule_rows("pndm", {5: True, 10: False, 15: True, 20: True, 30: True, 50: True})
            + _rule_rows("dpmsolver++", {5: True, 10: True, 15: True, 20: True, 30: True, 50: True}))
    rule = bs.default_rule({"rows": rows}, core=["ddim", "pndm"])
    assert (rule["sampler"], rule["steps"], rule["stable_from"]) == ("ddim", 20, 10)
    assert rule["seconds_per_pair"] == 20 / 50 and "twice" in rule["rule"]
    # the pndm rows are stable from 15: 30 steps, more than ddim's 20
    assert bs.default_rule({"rows": rows}, core=["pndm"])["steps"] == 30
    # no core sampler is stable at its largest step count -> no default
    assert bs.default_rule({"rows": _rule_rows("ddim", {10: True, 50: False})}, core=["ddim"]) is None


def test_sweep_ratios_compare_the_default_with_the_monai_baseline():
    bs = _load("bench_sampling")
    sweep = {"preset": "hippocampus", "dtype": "bfloat16", "batch": 8,
             "fastest_equal_quality": {"sampler": "unipc", "steps": 5, "seconds_per_pair": 0.1},
             "default_rule": {"sampler": "ddim", "steps": 20, "seconds_per_pair": 0.4}}
    result = {"sweep": sweep, "baselines": [{"preset": "hippocampus", "latency_s": 100.0, "extrapolated": True}]}
    ratios = bs.sweep_ratios(result)
    assert [round(r["value"]) for r in ratios] == [1000, 250]
    assert "default by the rule (ddim-20" in ratios[1]["name"] and ratios[1]["target"] == 100


def test_cores_report_states_the_ratio_and_verdict():
    bs = _load("bench_sampling")
    c = {"steps": 20, "dtype": "bfloat16", "pairs": 8, "repeats": 2, "target": 1.6,
         "rows": [{"threads": 1, "batch": 1, "seconds_per_pair": 1.0, "pairs_per_s": 1.0},
                  {"threads": 2, "batch": 8, "seconds_per_pair": 0.5, "pairs_per_s": 2.0}],
         "best_all_threads": {"threads": 2, "batch": 8}, "speedup_vs_1_thread_batch_1": 2.0}
    text = "\n".join(bs.markdown_cores(c))
    assert "| 2 | 8 | 0.500 | 2.000 |" in text and "**2.00x** pairs/s (target >= 1.6x: met)" in text
    c["speedup_vs_1_thread_batch_1"] = 1.2
    assert "NOT met" in "\n".join(bs.markdown_cores(c))


def test_profile_op_categories_and_gain_table():
    ps = _load("profile_sampling")
    assert ps.op_category("aten::mkldnn_convolution") == "convolution"
    assert ps.op_category("aten::native_group_norm") == "group norm"
    assert ps.op_category("aten::_to_copy") == "dtype casts / copies"
    assert ps.op_category("aten::addmm") == "linear" and ps.op_category("aten::baddbmm") == "attention"
    assert ps.op_category("aten::upsample_nearest3d") == "interpolate"
    assert ps.op_category("aten::silu_") == "elementwise" and ps.op_category("aten::weird_op") == "other"
    table = ps.category_table({"float32": {"convolution": 4.0, "group norm": 1.0},
                               "bfloat16": {"convolution": 1.0, "group norm": 2.0}})
    assert table[1].split()[:2] == ["convolution", "4.000"] and table[1].endswith("4.00x")
    assert table[2].startswith("group norm") and table[2].endswith("0.50x")
    assert table[-1].startswith("total") and table[-1].endswith("1.67x")


def test_label_side_check_compares_median_volumes_and_components():
    import torch

    lsc = _load("label_side_check")
    real = torch.zeros(3, 1, 8, 8, 8, dtype=torch.long)
    real[:, :, 1:3, 1:3, 1:3] = 1  # 8 voxels of class 1, one blob each
    synth = torch.zeros(2, 1, 8, 8, 8, dtype=torch.long)
    synth[:, :, 1:3, 1:3, 1:4] = 1  # 12 voxels: +50 %
    synth[0, :, 6, 6, 6] = 1  # a stray speck: 13 voxels and two components in the first map
    r = lsc.compare(real, synth, ["background", "a", "b"])
    a = r["classes"]["a"]
    assert a["real_median_voxels"] == 8 and a["synthetic_median_voxels"] == 12.5
    assert abs(a["difference_percent"] - 56.25) < 1e-9
    assert a["single_component_real"] == 1.0 and a["single_component_synthetic"] == 0.5
    assert r["all_classes_fraction"] == {"real": 0.0, "synthetic": 0.0}  # class b is nowhere
    md = lsc.to_markdown({"model": "m", "subset": "val", "num_real": 3, "num_samples": 2, "num_inference_steps": 50,
                          "seed": 0, "dtype": "float32", "seconds": 1.0, **r})
    assert "| a | 8 | 12 | +56.2 % | 100 % / 50 % | 1.50 |" in md

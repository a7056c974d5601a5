"""dtype="auto": the fastest dtype within tolerance of float32, measured once per machine and model, cached."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch

import duodiff.precision as precision
from duodiff import SyntheticPairDataset
from duodiff.precision import DtypeTrial, choose_dtype, measure_dtypes, pick_dtype

STEPS = 2


def trials(**by_dtype: tuple[float, float, float]) -> dict[str, dict[str, DtypeTrial]]:
    """Both stages with the same ``dtype=(step_s, decode_s, error)`` numbers."""
    return {stage: {name: DtypeTrial(name, *v) for name, v in by_dtype.items()} for stage in ("label", "image")}


class FakeMeasure:
    """A measuring function returning fixed trials and counting its calls."""

    def __init__(self, result: dict[str, dict[str, DtypeTrial]]) -> None:
        self.result, self.calls = result, 0

    def __call__(self, pipe) -> dict[str, dict[str, DtypeTrial]]:
        self.calls += 1
        return self.result


@pytest.fixture()
def auto(monkeypatch, tmp_path):
    """Let dtype='auto' measure (the suite pins it to float32) into a cache of this test's own."""
    monkeypatch.delenv(precision.AUTO_DTYPE_ENV, raising=False)
    monkeypatch.setenv(precision.CACHE_ENV, str(tmp_path / "cache"))
    precision._memo.clear()
    yield tmp_path / "cache" / precision.CACHE_FILE
    precision._memo.clear()


# ------------------------------------------------------------------ the choice
def test_the_faster_dtype_within_tolerance_wins():
    t = trials(float32=(0.10, 0.5, 0.0), bfloat16=(0.05, 0.2, 0.01))
    assert pick_dtype(t, 50) == "bfloat16"


def test_a_faster_dtype_beyond_tolerance_is_rejected():
    t = trials(float32=(0.10, 0.5, 0.0), bfloat16=(0.05, 0.2, 0.06), float16=(0.01, 0.1, float("inf")))
    assert pick_dtype(t, 50) == "float32"
    assert pick_dtype(t, 50, tolerance=0.1) == "bfloat16"


def test_one_stage_beyond_tolerance_rejects_the_dtype():
    t = trials(float32=(0.10, 0.5, 0.0), bfloat16=(0.05, 0.2, 0.0))
    t["image"]["bfloat16"] = DtypeTrial("bfloat16", 0.05, 0.2, 0.2)
    assert pick_dtype(t, 50) == "float32"


def test_the_step_count_weighs_steps_against_decoding():
    # bfloat16 steps are faster but its decode is slower: worth it for many steps only
    t = trials(float32=(0.10, 0.1, 0.0), bfloat16=(0.08, 1.0, 0.01))
    assert pick_dtype(t, 5) == "float32"
    assert pick_dtype(t, 100) == "bfloat16"
    assert DtypeTrial("float32", 0.1, 0.5, 0.0).seconds(10) == pytest.approx(1.5)


def test_float16_is_chosen_on_cuda_numbers():
    t = trials(float32=(0.10, 0.5, 0.0), float16=(0.03, 0.1, 0.004), bfloat16=(0.035, 0.1, 0.01))
    assert pick_dtype(t, 20) == "float16"


# ------------------------------------------------------------------ the cache
def test_the_measurement_is_cached_in_memory_and_on_disk(tiny_pipe, auto):
    fake = FakeMeasure(trials(float32=(0.10, 0.5, 0.0), bfloat16=(0.05, 0.2, 0.01)))
    assert choose_dtype(tiny_pipe, 50, measure=fake) == torch.bfloat16
    assert choose_dtype(tiny_pipe, 50, measure=fake) == torch.bfloat16
    assert fake.calls == 1
    data = json.loads(auto.read_text())
    (key,) = data["entries"]
    assert key == precision.cache_key(tiny_pipe) and key.startswith("cpu | ")
    assert data["entries"][key]["trials"]["image"]["bfloat16"]["step_s"] == 0.05
    precision._memo.clear()  # a new process: reads the file, does not measure
    assert choose_dtype(tiny_pipe, 50, measure=fake) == torch.bfloat16
    assert fake.calls == 1


def test_other_weights_or_threads_are_measured_again(tiny_pipe, auto):
    fake = FakeMeasure(trials(float32=(0.10, 0.5, 0.0), bfloat16=(0.05, 0.2, 0.01)))
    choose_dtype(tiny_pipe, 50, measure=fake)
    other = copy.deepcopy(tiny_pipe)
    with torch.no_grad():
        next(other.label_unet.parameters()).add_(1.0)
    choose_dtype(other, 50, measure=fake)
    assert fake.calls == 2
    from duodiff.threads import intra_op_threads

    with intra_op_threads(torch.get_num_threads() + 1):
        choose_dtype(tiny_pipe, 50, measure=fake)
    assert fake.calls == 3
    assert len(json.loads(auto.read_text())["entries"]) == 3


def test_an_explicit_cache_path_is_used(tiny_pipe, auto, tmp_path):
    fake = FakeMeasure(trials(float32=(0.10, 0.5, 0.0), bfloat16=(0.50, 0.2, 0.01)))
    path = tmp_path / "elsewhere" / "choices.json"
    assert choose_dtype(tiny_pipe, 50, cache_path=path, measure=fake) == torch.float32
    assert path.is_file() and not auto.exists()


def test_a_corrupt_cache_is_replaced(tiny_pipe, auto, caplog):
    auto.parent.mkdir(parents=True)
    auto.write_text("{not json")
    fake = FakeMeasure(trials(float32=(0.10, 0.5, 0.0), bfloat16=(0.05, 0.2, 0.01)))
    with caplog.at_level(logging.WARNING, logger="duodiff.precision"):
        assert choose_dtype(tiny_pipe, 50, measure=fake) == torch.bfloat16
    assert "unreadable dtype cache" in caplog.text
    assert json.loads(auto.read_text())["version"] == 1


def test_an_unwritable_cache_warns_and_still_chooses(tiny_pipe, auto, tmp_path, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    fake = FakeMeasure(trials(float32=(0.10, 0.5, 0.0), bfloat16=(0.05, 0.2, 0.01)))
    with caplog.at_level(logging.WARNING, logger="duodiff.precision"):
        assert choose_dtype(tiny_pipe, 50, cache_path=blocker / "c.json", measure=fake) == torch.bfloat16
    assert "Could not write the dtype cache" in caplog.text and precision.CACHE_ENV in caplog.text


def test_the_environment_pin_skips_measuring(tiny_pipe, auto, monkeypatch):
    fake = FakeMeasure(trials(float32=(0.10, 0.5, 0.0)))
    monkeypatch.setenv(precision.AUTO_DTYPE_ENV, "bf16")
    assert choose_dtype(tiny_pipe, 50, measure=fake) == torch.bfloat16 and fake.calls == 0
    monkeypatch.setenv(precision.AUTO_DTYPE_ENV, "int8")
    with pytest.raises(ValueError, match="DUODIFF_AUTO_DTYPE='int8' is not a dtype"):
        choose_dtype(tiny_pipe, 50, measure=fake)


def test_low_precision_weights_choose_themselves(tiny_pipe, auto):
    fake = FakeMeasure(trials(float32=(0.10, 0.5, 0.0)))
    half = copy.deepcopy(tiny_pipe).to(dtype="bfloat16")
    assert choose_dtype(half, 50, measure=fake) == torch.bfloat16 and fake.calls == 0


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(precision.CACHE_ENV, str(tmp_path / "x"))
    assert precision.cache_dir() == tmp_path / "x"
    monkeypatch.delenv(precision.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert precision.cache_dir() == tmp_path / "xdg" / "duodiff"


# ------------------------------------------------------------------ measuring for real (tiny model, CPU)
def test_measure_dtypes_times_and_checks_each_candidate(tiny_pipe, one_thread):
    result = measure_dtypes(tiny_pipe, num_steps=2, repeats=1)
    assert set(result) == {"label", "image"}
    for stage in result:
        assert set(result[stage]) == set(precision.CANDIDATES["cpu"])
        fp32, bf16 = result[stage]["float32"], result[stage]["bfloat16"]
        assert fp32.error == 0.0 and fp32.step_s > 0 and fp32.decode_s > 0
        assert 0.0 < bf16.error < 1.0 and bf16.step_s > 0, bf16  # bf16 rounds: close to fp32, not equal


# ------------------------------------------------------------------ the default of sample, the dataset, the CLI
def test_sample_auto_uses_the_chosen_dtype(tiny_pipe, auto, monkeypatch, one_thread):
    fake = FakeMeasure(trials(float32=(0.10, 0.5, 0.0), bfloat16=(0.05, 0.2, 0.01)))
    monkeypatch.setattr(precision, "measure_dtypes", fake)
    kw = dict(seed=3, num_inference_steps=STEPS, progress=False)
    auto_out = tiny_pipe.sample(1, **kw)  # the default is "auto"
    assert fake.calls == 1
    assert torch.equal(auto_out.images, tiny_pipe.sample(1, dtype="bfloat16", **kw).images)
    assert not torch.equal(auto_out.images, tiny_pipe.sample(1, dtype="float32", **kw).images)
    assert torch.equal(tiny_pipe.sample_labels(1, **kw), tiny_pipe.sample_labels(1, dtype="bfloat16", **kw))
    assert fake.calls == 1


def test_the_dataset_resolves_auto_once(tiny_pipe, auto, monkeypatch):
    fake = FakeMeasure(trials(float32=(0.10, 0.5, 0.0), bfloat16=(0.05, 0.2, 0.01)))
    monkeypatch.setattr(precision, "measure_dtypes", fake)
    ds = SyntheticPairDataset(tiny_pipe, 2, num_inference_steps=STEPS)
    assert ds.generation["dtype"] == "bfloat16" and "dtype='bfloat16'" in repr(ds)
    SyntheticPairDataset(tiny_pipe, 2, num_inference_steps=STEPS, dtype="float32")
    assert fake.calls == 1


def test_the_cli_defaults_to_auto():
    from duodiff.cli.main import build_parser

    args = build_parser().parse_args(["sample", "--out", "x"])
    assert args.dtype == "auto"

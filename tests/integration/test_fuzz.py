"""Property-based fuzzing (hypothesis) of the inputs users hand to duodiff.

* config parsing: any JSON-like mutation of a valid config either parses into a config that
  round-trips exactly, or fails with a ``TypeError``/``ValueError`` with a message; nothing else escapes;
* label validation: any array either passes unchanged (as int64) or is refused with a typed error;
* the mixing sampler's arguments: any combination is refused with a typed error or yields batches that
  keep the documented contract (counts, index ranges, reals first, DDP shares, determinism).
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from duodiff import PipelineConfig, keys, make_config
from duodiff.testing import tiny_pipeline

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------------------------------ config parsing
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 300), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=8,
)
# values that are often *almost* right: small ints, tuples of plausible sizes, plausible strings
plausible = st.one_of(
    st.integers(-2, 64),
    st.lists(st.integers(-1, 33), min_size=0, max_size=4),
    st.lists(st.booleans(), max_size=4),
    st.lists(st.floats(-2, 4, allow_nan=False), max_size=4),
    st.sampled_from(["epsilon", "v_prediction", "sample", "cosine", "linear_beta", "x"]),
    st.floats(-1, 2),
)


def _base(num_classes: int) -> dict:
    return make_config("tiny", num_classes=num_classes).to_dict()


def _paths(data: dict, prefix=()) -> list[tuple]:
    out = []
    for k, v in data.items():
        out.append((*prefix, k))
        if isinstance(v, dict):
            out += _paths(v, (*prefix, k))
    return out


@st.composite
def mutated_configs(draw) -> dict:
    data = _base(draw(st.integers(2, 5)))
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(data)
        path = draw(st.sampled_from(paths))
        parent = data
        for k in path[:-1]:
            parent = parent[k]
        action = draw(st.sampled_from(["set", "set", "set", "delete", "add"]))
        if action == "delete":
            parent.pop(path[-1], None)
        elif action == "add":
            parent[draw(st.text(min_size=1, max_size=8))] = draw(json_values)
        else:
            parent[path[-1]] = draw(st.one_of(plausible, json_values))
    return data


@FUZZ
@given(mutated_configs())
def test_config_parsing_never_crashes_and_round_trips(data):
    before = copy.deepcopy(data)
    try:
        cfg = PipelineConfig.from_dict(data)
    except (TypeError, ValueError) as e:  # ConfigError is a ValueError
        event(f"refused: {type(e).__name__}")
        assert str(e).strip(), f"empty message for {type(e).__name__}"
        return
    finally:
        assert data == before or _has_nan(before), "from_dict must not mutate its input"
    text = json.dumps(cfg.to_dict(), allow_nan=False)  # strict JSON: no NaN/Inf slipped through
    assert PipelineConfig.from_dict(json.loads(text)) == cfg


def _has_nan(x) -> bool:
    if isinstance(x, float):
        return math.isnan(x)
    if isinstance(x, dict):
        return any(_has_nan(v) for v in x.values())
    if isinstance(x, list):
        return any(_has_nan(v) for v in x)
    return False


@FUZZ
@given(component=st.sampled_from(keys.COMPONENTS), key=st.sampled_from(
    ["channels", "norm_num_groups", "num_head_channels", "num_res_blocks", "attention_levels", "latent_channels",
     "in_channels", "conditioning_embedding_num_channels"]), value=plausible)
def test_component_fields_never_crash(component, key, value):
    data = _base(3)
    if key not in data[component]:
        return
    data[component][key] = value
    try:
        PipelineConfig.from_dict(data)
    except (TypeError, ValueError) as e:
        assert component in str(e) or "volume_shape" in str(e), f"the message must say which component: {e}"


any_float = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3))


@FUZZ
@given(field=st.sampled_from(["spacing", "intensity_range", "label_scale_factor", "image_scale_factor"]),
       values=st.lists(any_float, min_size=3, max_size=3), wrong_length=st.booleans())
def test_float_fields_reject_nan_inf_and_round_trip(field, values, wrong_length):
    data = _base(3)
    if isinstance(data[field], list):
        data[field] = values if wrong_length else values[: len(data[field])]
    else:
        data[field] = values[0]
    try:
        cfg = PipelineConfig.from_dict(data)
    except (TypeError, ValueError) as e:
        assert field in str(e)
        return
    text = json.dumps(cfg.to_dict(), allow_nan=False)
    assert PipelineConfig.from_dict(json.loads(text)) == cfg


# ------------------------------------------------------------------------------------------ label validation
@pytest.fixture(scope="module")
def small_pipe():
    """Tiny preset at 4^3 voxels: validation only, no network is run."""
    return tiny_pipeline(volume_shape=(4, 4, 4), randomize=False)


label_dtypes = st.sampled_from([np.int8, np.uint8, np.int16, np.int32, np.int64, np.uint16, np.float32,
                                np.float64, np.bool_])
label_shapes = st.one_of(
    st.sampled_from([(1, 1, 4, 4, 4), (2, 4, 4, 4), (3, 1, 4, 4, 4)]),  # valid layouts
    hnp.array_shapes(min_dims=0, max_dims=6, min_side=0, max_side=5),
)


@FUZZ
@given(dtype=label_dtypes, shape=label_shapes, data=st.data())
def test_label_validation(small_pipe, dtype, shape, data):
    arr = data.draw(hnp.arrays(dtype, shape, elements=hnp.from_dtype(np.dtype(dtype), allow_nan=True)
                               if np.dtype(dtype).kind == "f" else None))
    as_tensor = data.draw(st.booleans())
    labels = torch.from_numpy(arr.copy()) if as_tensor else arr
    try:
        out = small_pipe.validate_labels(labels)
    except TypeError as e:
        assert "labels" in str(e)
        assert arr.dtype.kind in "fb", str(e)  # only non-integer dtypes are a type error
        return
    except ValueError as e:
        assert "label" in str(e)
        return
    # accepted: integer ids in range, the documented layout, values unchanged
    assert arr.dtype.kind in "iu"
    assert out.dtype == torch.long and out.ndim == 5 and tuple(out.shape[1:]) == (1, 4, 4, 4)
    assert out.shape[0] >= 1 and int(out.min()) >= 0 and int(out.max()) < 3
    np.testing.assert_array_equal(out.reshape(arr.shape).numpy(), arr.astype(np.int64))


# ------------------------------------------------------------------------------------------ mixing sampler
mixing = pytest.importorskip("duodiff.data.mixing")


@st.composite
def sampler_args(draw) -> dict:
    """Mostly valid arguments (to exercise the batches), one in four drawn from wide, often invalid ranges."""
    wide = draw(st.integers(0, 3)) == 0
    schedule = draw(st.sampled_from(["constant", "linear", "cosine"] + (["bogus"] if wide else [])))
    frac = st.one_of(st.floats(-1, 2), st.none(), st.just(1.0)) if wide else st.one_of(
        st.floats(0, 0.9), st.sampled_from([0.0, 0.25, 0.5]))
    args = dict(
        batch_size=draw(st.integers(-1, 8) if wide else st.integers(1, 8)),
        synthetic_fraction=draw(frac),
        schedule=schedule,
        final_synthetic_fraction=draw(frac) if schedule != "constant" else None,
        num_epochs=draw(st.one_of(st.none(), st.integers(0, 4)) if wide else st.integers(1, 4)),
        schedule_unit=draw(st.sampled_from(["epoch", "step"] + (["batch"] if wide else []))),
        min_real_per_batch=draw(st.integers(0, 3) if wide else st.integers(0, 1)),
        shuffle=draw(st.booleans()),
        drop_last=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31)),
        num_replicas=draw(st.integers(1, 3)),
    )
    sizes = (draw(st.integers(0 if wide else 1, 30)), draw(st.integers(0 if wide else 1, 30)))
    return {"sizes": sizes, **args}


def _dataset(sizes):
    from torch.utils.data import ConcatDataset

    return ConcatDataset([list(range(sizes[0])), list(range(sizes[1]))])


@settings(FUZZ, max_examples=200)
@given(sampler_args())
def test_mixed_batch_sampler_arguments(args):
    sizes = args.pop("sizes")
    num_real, num_syn = sizes
    try:
        samplers = [mixing.MixedBatchSampler(_dataset(sizes), **{**args, "rank": r})
                    for r in range(args["num_replicas"])]
    except (TypeError, ValueError) as e:
        event("refused")
        assert str(e).strip()
        return
    event("accepted")
    B, min_real = args["batch_size"], args["min_real_per_batch"]
    epochs = sorted({0, (args["num_epochs"] or 1) - 1})
    for epoch in epochs:
        per_rank = []
        for s in samplers:
            s.set_epoch(epoch)
            batches = list(s)
            assert len(batches) == len(s) == len(s.batch_plan(epoch))
            for batch, (n_real, n_syn) in zip(batches, s.batch_plan(epoch)):
                assert 1 <= len(batch) <= B and len(batch) == n_real + n_syn
                reals, syns = batch[:n_real], batch[n_real:]
                assert all(0 <= i < num_real for i in reals), "reals first, in range"
                assert all(num_real <= i < num_real + num_syn for i in syns)
                assert n_real >= 1
                if n_real + n_syn == B:  # a full batch keeps the documented rule
                    assert n_real >= min_real
            per_rank.append(batches)
        assert len({len(b) for b in per_rank}) == 1, "every rank yields the same number of batches"
        reals = [i for batches in per_rank for b in batches for i in b if i < num_real]
        syns = [i for batches in per_rank for b in batches for i in b if i >= num_real]
        if not args["drop_last"]:
            assert set(reals) == set(range(num_real)), "an epoch covers every real sample"
        if len(syns) <= num_syn and epoch == 0:
            assert len(set(syns)) == len(syns), "synthetic samples do not repeat before the set is used up"
    # the same arguments give the same batches
    again = mixing.MixedBatchSampler(_dataset(sizes), **{**args, "rank": 0})
    again.set_epoch(epochs[-1])
    samplers[0].set_epoch(epochs[-1])
    assert list(again) == list(samplers[0])


@FUZZ
@given(schedule=st.sampled_from(["constant", "linear", "cosine"]), start=st.floats(0, 1), end=st.floats(0, 1),
       progress=st.floats(-10, 10))
def test_fraction_schedule_stays_in_range(schedule, start, end, progress):
    f = mixing.FractionSchedule(schedule, synthetic_fraction=start,
                                final_synthetic_fraction=None if schedule == "constant" else end)
    value = f(progress)
    assert min(start, end) - 1e-12 <= value <= max(start, end) + 1e-12 if schedule != "constant" else value == start


@FUZZ
@given(fraction=st.floats(0, 0.99), real_batch=st.integers(1, 16))
def test_mix_loaders_count_rule(fraction, real_batch):
    n = mixing.MixedLoader.synthetic_count(fraction, real_batch)
    assume(n + real_batch > 0)
    assert n == mixing.round_half_up(fraction * real_batch / (1 - fraction))
    assert n >= 0

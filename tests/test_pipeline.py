"""DuoDiffusion: output contract (shapes, dtypes, ranges), input validation, schedulers, dtypes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from duodiff import DuoDiffusion, DuoSample
from duodiff.io import spacing_affine
from tests.conftest import make_tiny

STEPS = 2


@pytest.fixture(scope="module")
def out(tiny_pipe) -> DuoSample:
    return tiny_pipe.sample(3, seed=5, num_inference_steps=STEPS, progress=False)


# ------------------------------------------------------------------ output contract
def test_sample_shapes_dtypes_ranges(tiny_pipe, out):
    assert isinstance(out, DuoSample) and len(out) == 3
    assert out.images.dtype == torch.float32 and out.images.shape == (3, 1, 16, 16, 16)
    assert out.labels.dtype == torch.int64 and out.labels.shape == (3, 1, 16, 16, 16)
    assert out.images.device.type == "cpu" and out.labels.device.type == "cpu"
    assert float(out.images.min()) >= 0.0 and float(out.images.max()) <= 1.0
    assert torch.isfinite(out.images).all()
    # not a constant: random weights give a structured output
    assert float(out.images.std()) > 0.01
    ids = set(out.labels.unique().tolist())
    assert ids <= {0, 1, 2} and len(ids) >= 2


def test_sample_metadata(tiny_pipe, out):
    assert out.seeds == [5, 6, 7]
    assert out.spacing == (1.5, 0.75, 2.0)
    assert out.label_names == ("background", "anterior", "posterior")
    assert out.affine.dtype == np.float64 and out.affine.shape == (4, 4)
    np.testing.assert_array_equal(out.affine, spacing_affine((1.5, 0.75, 2.0)))
    np.testing.assert_array_equal(np.diag(out.affine), [1.5, 0.75, 2.0, 1.0])
    assert "n=3" in repr(out) and "anterior" in repr(out)


def test_labels_only_contain_valid_ids_for_many_classes():
    pipe = make_tiny(6, seed=3)
    res = pipe.sample(2, seed=0, num_inference_steps=STEPS, progress=False)
    assert int(res.labels.min()) >= 0 and int(res.labels.max()) < 6


def test_image_channels_two():
    pipe = make_tiny(3, image_channels=2, volume_shape=(16, 24, 32))
    res = pipe.sample(2, seed=0, num_inference_steps=STEPS, progress=False)
    assert res.images.shape == (2, 2, 16, 24, 32)
    assert res.labels.shape == (2, 1, 16, 24, 32)
    assert not torch.equal(res.images[:, 0], res.images[:, 1])
    again = pipe.generate_images(res.labels, seed=0, num_inference_steps=STEPS, progress=False)
    assert again.images.shape == (2, 2, 16, 24, 32)


def test_sample_with_batch_size_smaller_than_n(tiny_pipe):
    res = tiny_pipe.sample(5, seed=0, batch_size=2, num_inference_steps=STEPS, progress=False)
    assert res.images.shape[0] == 5 and res.seeds == [0, 1, 2, 3, 4]


def test_repr_lists_components(tiny_pipe):
    text = repr(tiny_pipe)
    assert text.startswith("DuoDiffusion(") and "image_controlnet=" in text and "anterior" in text


# ------------------------------------------------------------------ schedulers and steps
@pytest.mark.parametrize("scheduler", ["ddpm", "ddim", "pndm", "DDIM"])
def test_all_schedulers_run(tiny_pipe, scheduler):
    res = tiny_pipe.sample(1, seed=0, num_inference_steps=STEPS, scheduler=scheduler, progress=False)
    assert res.images.shape == (1, 1, 16, 16, 16) and torch.isfinite(res.images).all()


def test_schedulers_differ(tiny_pipe):
    a = tiny_pipe.sample(1, seed=0, num_inference_steps=3, scheduler="ddim", progress=False)
    b = tiny_pipe.sample(1, seed=0, num_inference_steps=3, scheduler="ddpm", progress=False)
    assert not torch.equal(a.images, b.images)


def test_unknown_scheduler(tiny_pipe):
    with pytest.raises(ValueError, match=r"scheduler must be one of \['ddpm', 'ddim', 'pndm', 'dpmsolver\+\+', "
                                         r"'unipc', 'rflow'\] or None \(each stage's own\), got 'euler'"):
        tiny_pipe.sample(1, seed=0, num_inference_steps=STEPS, scheduler="euler", progress=False)


def test_too_many_inference_steps(tiny_pipe):
    t = tiny_pipe.config.scheduler.num_train_timesteps
    with pytest.raises(ValueError) as e:
        tiny_pipe.sample(1, seed=0, num_inference_steps=t + 1, progress=False)
    assert f"num_train_timesteps ({t})" in str(e.value) and f"got {t + 1}" in str(e.value)
    with pytest.raises(ValueError, match="got 0"):
        tiny_pipe.sample(1, seed=0, num_inference_steps=0, progress=False)
    with pytest.raises(TypeError, match="num_inference_steps must be an int"):
        tiny_pipe.sample(1, seed=0, num_inference_steps=2.0, progress=False)


@pytest.mark.parametrize(
    "kwargs, exc, fragment",
    [
        (dict(num_samples=0), ValueError, "num_samples must be a positive int, got 0"),
        (dict(num_samples=2, seed=[1]), ValueError, "Got 1 seeds for 2 samples"),
        (dict(num_samples=1, seed=-1), ValueError, "seeds must be >= 0"),
        (dict(num_samples=1, seed="1"), TypeError, "seed must be an int"),
        (dict(num_samples=1, seed=0, generator=torch.Generator()), ValueError, "either seed or generator"),
        (dict(num_samples=1, batch_size=0), ValueError, "batch_size must be a positive int"),
        (dict(num_samples=1, conditioning_scale="1"), TypeError, "conditioning_scale must be a number"),
        (dict(num_samples=1, dtype="int8"), ValueError, "dtype must be one of"),
    ],
)
def test_sample_argument_validation(tiny_pipe, kwargs, exc, fragment):
    n = kwargs.pop("num_samples")
    with pytest.raises(exc) as e:
        tiny_pipe.sample(n, num_inference_steps=STEPS, progress=False, **kwargs)
    assert fragment in str(e.value)


# ------------------------------------------------------------------ generate_images validation
def test_generate_images_rejects_float_labels(tiny_pipe, out):
    with pytest.raises(TypeError) as e:
        tiny_pipe.generate_images(out.labels.float(), seed=0, num_inference_steps=STEPS, progress=False)
    assert "integer dtype" in str(e.value) and "torch.float32" in str(e.value)
    with pytest.raises(TypeError, match="torch.bool"):
        tiny_pipe.generate_images(out.labels > 0, seed=0, num_inference_steps=STEPS, progress=False)


@pytest.mark.parametrize("bad_id", [3, 7, -1])
def test_generate_images_rejects_out_of_range_ids(tiny_pipe, out, bad_id):
    labels = out.labels.clone()
    labels[0, 0, 1, 2, 3] = bad_id
    with pytest.raises(ValueError) as e:
        tiny_pipe.generate_images(labels, seed=0, num_inference_steps=STEPS, progress=False)
    msg = str(e.value)
    assert f"found id {bad_id}" in msg and "range(0, 3)" in msg and "anterior" in msg


@pytest.mark.parametrize("shape", [(1, 1, 16, 16, 8), (1, 2, 16, 16, 16), (16, 16, 16), (1, 1, 1, 16, 16, 16)])
def test_generate_images_rejects_wrong_shapes(tiny_pipe, shape):
    labels = torch.zeros(shape, dtype=torch.long)
    with pytest.raises(ValueError) as e:
        tiny_pipe.generate_images(labels, seed=0, num_inference_steps=STEPS, progress=False)
    msg = str(e.value)
    assert f"got {shape}" in msg and "(N, 1, 16, 16, 16)" in msg


def test_generate_images_rejects_empty_and_non_tensors(tiny_pipe):
    with pytest.raises(ValueError, match="empty"):
        tiny_pipe.generate_images(torch.zeros((0, 1, 16, 16, 16), dtype=torch.long), seed=0, progress=False)
    with pytest.raises(TypeError, match="list"):
        tiny_pipe.generate_images([[0]], seed=0, progress=False)  # type: ignore[arg-type]


def test_generate_images_accepts_numpy_uint8_and_4d(tiny_pipe, out):
    arr = out.labels[:, 0].numpy().astype(np.uint8)  # (N, H, W, D) uint8
    res = tiny_pipe.generate_images(arr, seed=5, num_inference_steps=STEPS, progress=False)
    assert res.labels.dtype == torch.int64 and res.labels.shape == out.labels.shape
    assert torch.equal(res.labels, out.labels)
    assert res.images.shape == out.images.shape
    assert res.seeds == [5, 6, 7]


def test_conditioning_scale_changes_images(tiny_pipe, out):
    kw = dict(seed=0, num_inference_steps=STEPS, progress=False)
    a = tiny_pipe.generate_images(out.labels[:1], conditioning_scale=1.0, **kw)
    b = tiny_pipe.generate_images(out.labels[:1], conditioning_scale=0.0, **kw)
    assert not torch.equal(a.images, b.images)


def test_images_depend_on_labels(tiny_pipe, out):
    # the ControlNet sees the label map: different labels, same seed -> different images
    kw = dict(seed=0, num_inference_steps=STEPS, progress=False)
    a = tiny_pipe.generate_images(out.labels[:1], **kw)
    b = tiny_pipe.generate_images(torch.zeros_like(out.labels[:1]), **kw)
    assert not torch.equal(a.images, b.images)


# ------------------------------------------------------------------ dtypes / devices
def test_bf16_autocast_is_close_to_fp32_and_returns_float32(tiny_pipe, out):
    lab = out.labels[:1]
    kw = dict(seed=5, num_inference_steps=STEPS, progress=False)
    exact = tiny_pipe.generate_images(lab, **kw)
    fast = tiny_pipe.generate_images(lab, dtype="bfloat16", **kw)
    assert fast.images.dtype == torch.float32
    assert 0.0 <= float(fast.images.min()) and float(fast.images.max()) <= 1.0
    # bf16 has ~3 significant digits; the tiny random model amplifies it somewhat
    assert float((fast.images - exact.images).abs().mean()) < 0.05
    assert not torch.equal(fast.images, exact.images)  # autocast really ran
    full = tiny_pipe.sample(1, dtype="bf16", **kw)
    assert full.labels.dtype == torch.int64 and full.images.dtype == torch.float32


def test_low_precision_weights_sample_with_matching_autocast():
    pipe = make_tiny(3)
    ref = pipe.sample(1, seed=0, num_inference_steps=STEPS, progress=False)
    assert pipe.to(dtype="bfloat16") is pipe and pipe.dtype == torch.bfloat16
    low = pipe.sample(1, seed=0, num_inference_steps=STEPS, progress=False)  # dtype=None -> bf16 autocast
    assert low.images.dtype == torch.float32 and low.labels.dtype == torch.int64
    assert float((low.images - ref.images).abs().mean()) < 0.05
    with pytest.raises(ValueError, match=r"dtype='float32' does not match the pipeline's torch.bfloat16 weights"):
        pipe.sample(1, seed=0, num_inference_steps=STEPS, dtype="float32", progress=False)
    pipe.to(dtype=torch.float32)
    assert pipe.dtype == torch.float32


def test_constructor_validates_components(tiny_pipe):
    comps = tiny_pipe.components()
    with pytest.raises(ValueError, match=r"missing \['image_controlnet'\]"):
        DuoDiffusion(tiny_pipe.config, {k: v for k, v in comps.items() if k != "image_controlnet"})
    with pytest.raises(TypeError, match="PipelineConfig"):
        DuoDiffusion(tiny_pipe.config.to_dict(), comps)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="label_unet must be a torch.nn.Module"):
        DuoDiffusion(tiny_pipe.config, dict(comps, label_unet="unet"))


def test_sampling_does_not_touch_global_rng(tiny_pipe):
    state = torch.random.get_rng_state()
    tiny_pipe.sample(1, seed=0, num_inference_steps=STEPS, scheduler="ddpm", progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_progress_bars_can_be_disabled(tiny_pipe, capsys):
    tiny_pipe.sample(1, seed=0, num_inference_steps=STEPS, progress=False)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""
    tiny_pipe.sample(1, seed=0, num_inference_steps=STEPS, progress=True)
    assert "labels" in capsys.readouterr().err


def test_compile_keeps_results_and_weights(tmp_path):
    """``pipe.compile()`` (eager backend: the dynamo capture path without C++ codegen, fast in tests) gives the
    same samples and leaves the saved state-dict keys unchanged."""
    pipe = make_tiny()
    before = pipe.sample(1, seed=3, num_inference_steps=2, progress=False)
    keys_before = {n: sorted(m.state_dict()) for n, m in pipe.components().items()}
    assert pipe.compile(backend="eager") is pipe
    after = pipe.sample(1, seed=3, num_inference_steps=2, progress=False)
    torch.testing.assert_close(after.images, before.images, rtol=1e-5, atol=1e-5)
    assert torch.equal(after.labels, before.labels)
    assert {n: sorted(m.state_dict()) for n, m in pipe.components().items()} == keys_before
    pipe.save_pretrained(tmp_path / "m")
    again = DuoDiffusion.from_pretrained(tmp_path / "m").sample(1, seed=3, num_inference_steps=2, progress=False)
    torch.testing.assert_close(again.images, before.images, rtol=1e-5, atol=1e-5)


def test_to_takes_a_dtype_first_like_diffusers():
    """``pipe.to(torch.bfloat16)`` / ``pipe.to("float32")`` cast without moving (diffusers' spelling)."""
    from tests.conftest import make_tiny

    pipe = make_tiny(3)
    assert pipe.to(torch.bfloat16) is pipe and pipe.dtype == torch.bfloat16 and pipe.device.type == "cpu"
    assert pipe.to("float32").dtype == torch.float32
    assert pipe.to("cpu", torch.float16).dtype == torch.float16
    with pytest.raises(ValueError, match="dtype must be"):
        pipe.to(torch.int8)

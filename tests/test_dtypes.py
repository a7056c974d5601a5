"""duodiff.dtypes: dtype names and autocast, shared by the pipeline, dtype="auto" and training."""

from __future__ import annotations

import pytest
import torch

from duodiff.dtypes import DTYPES, autocast, autocast_dtype, is_dtype_name, resolve_dtype


@pytest.mark.parametrize("name, expected", [("bf16", torch.bfloat16), ("float16", torch.float16),
                                            ("BFloat16", torch.bfloat16), ("fp32", torch.float32),
                                            (torch.bfloat16, torch.bfloat16), (None, None)])
def test_resolve_dtype(name, expected):
    assert resolve_dtype(name) is expected


@pytest.mark.parametrize("bad, match", [(torch.float64, "torch.float64"), ("float64", "'float64'"), ("auto", "'auto'"),
                                        (3, "3")])
def test_resolve_dtype_rejects_others(bad, match):
    with pytest.raises(ValueError, match=match):
        resolve_dtype(bad)


def test_older_import_paths_give_the_same_function():
    import duodiff.pipeline

    assert duodiff.pipeline.resolve_dtype is resolve_dtype


def test_dtype_names():
    assert is_dtype_name("BF16") and is_dtype_name("float32")
    assert not is_dtype_name("cuda") and not is_dtype_name(torch.float16) and not is_dtype_name(None)
    assert set(DTYPES.values()) == {torch.float32, torch.bfloat16, torch.float16}


@pytest.mark.parametrize("dtype", [None, torch.float32])
def test_no_autocast_for_float32(dtype):
    with autocast("cpu", dtype):
        assert autocast_dtype("cpu") is None
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_bfloat16_autocast_on_cpu():
    with autocast("cpu", torch.bfloat16):
        assert autocast_dtype("cpu") == torch.bfloat16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    assert autocast_dtype("cpu") is None

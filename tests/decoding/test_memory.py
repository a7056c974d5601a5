"""Decoder memory: the estimate matches the measured peak."""

from __future__ import annotations

import torch

from duodiff.decoding import estimate_decode_bytes, peak_tensor_bytes


def test_estimate_matches_measured_peak(pipe):
    ae = pipe.image_autoencoder
    z = torch.randn(1, 3, 12, 12, 12)
    with torch.inference_mode():
        measured = peak_tensor_bytes(lambda: ae.decode(z))
        estimated = estimate_decode_bytes(ae, (12, 12, 12))
    assert abs(estimated - measured) / measured < 0.15

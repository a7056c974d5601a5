"""Memory-bounded VAE decoding: exact strategies, the memory cap, clear memory errors, the recorded decode path."""

from __future__ import annotations

import pytest
import torch

from duodiff.decoding import decode, estimate_decode_bytes, peak_tensor_bytes, resolve_tile_size, seam_report
from tests.decoding.test_seams import IMAGE_MEAN_ABS_TOL, LABEL_AGREEMENT_TOL


def test_tile_covering_the_latent_is_the_whole_decode(pipe, latents):
    ae = pipe.image_autoencoder
    with torch.inference_mode():
        whole = decode(ae, latents, tile_size=None)
        covering = decode(ae, latents, tile_size=64)  # clipped to the latent: whole volumes
    assert whole.dtype == torch.float32 and tuple(whole.shape) == (2, 1, 24, 24, 24)
    assert torch.equal(whole, covering)


@pytest.mark.parametrize("num, fraction", [(2, 0.7), (1, 0.5)])
def test_memory_cap_is_honoured(pipe, latents, num, fraction):
    """A cap below the whole-batch peak forces sub-batches (2 volumes, 0.7) or tiles (1 volume, 0.5)."""
    ae, z = pipe.image_autoencoder, latents[:num]
    with torch.inference_mode():
        whole_peak = peak_tensor_bytes(lambda: decode(ae, z, tile_size=None))
        cap = int(fraction * whole_peak)
        plan = resolve_tile_size(ae, z.shape, "auto", max_memory=cap)
        assert (plan.tile is None) == (num == 2)
        peak = peak_tensor_bytes(lambda: decode(ae, z, tile_size="auto", max_memory=cap))
    assert peak <= cap, f"decode used {peak / 2**20:.2f} MiB with a {cap / 2**20:.2f} MiB cap"


def test_sub_batches_are_exact_and_tiles_only_when_needed(pipe, latents):
    ae = pipe.image_autoencoder
    with torch.inference_mode():
        per_volume = estimate_decode_bytes(ae, (12, 12, 12))
        out_bytes = 4 * 24**3 * 2
        plan = resolve_tile_size(ae, latents.shape, "auto", max_memory=per_volume + out_bytes + 1000)
        assert (plan.volumes_per_call, plan.tile) == (1, None)
        whole = decode(ae, latents, tile_size=None)
        sub = decode(ae, latents, tile_size="auto", max_memory=per_volume + out_bytes + 1000)
    torch.testing.assert_close(sub, whole, rtol=1e-4, atol=1e-4)
    plan = resolve_tile_size(ae, latents.shape, "auto", max_memory=per_volume // 2)
    assert plan.tile is not None and all(t <= 12 for t in plan.tile)


def test_budget_too_small_raises_memory_error(pipe, latents):
    with pytest.raises(MemoryError, match="Cannot decode within"), torch.inference_mode():
        decode(pipe.image_autoencoder, latents, tile_size="auto", max_memory=1000)


def test_bad_overlap_halo_and_kind_are_rejected(pipe, latents):
    with pytest.raises(ValueError, match="overlap"):
        decode(pipe.image_autoencoder, latents, tile_size=8, overlap=1.0)
    with pytest.raises(ValueError, match="halo"):
        decode(pipe.image_autoencoder, latents, tile_size=8, halo=-1)
    with pytest.raises(ValueError, match="kind"):
        seam_report(pipe.image_autoencoder, latents, tile_size=8, kind="mask")


def test_pipeline_sample_with_tiled_decoding(pipe):
    common = dict(seed=3, num_inference_steps=2, progress=False)
    whole = pipe.sample(1, decode_tile_size=None, **common)
    covering = pipe.sample(1, decode_tile_size=(16, 16, 16), **common)
    tiled = pipe.sample(1, decode_tile_size=(16, 16, 8), **common)
    assert torch.equal(whole.images, covering.images) and torch.equal(whole.labels, covering.labels)
    assert tiled.images.shape == whole.images.shape and tiled.labels.dtype == torch.int64
    assert not torch.equal(tiled.images, whole.images)  # the tiles were really used
    assert (tiled.images - whole.images).abs().mean() <= IMAGE_MEAN_ABS_TOL
    assert (tiled.labels == whole.labels).float().mean() >= LABEL_AGREEMENT_TOL


def test_pipeline_rejects_bad_tile_size_before_sampling(pipe, monkeypatch):
    def boom(*a, **k):  # pragma: no cover - must not be reached
        raise AssertionError("sampling started")

    monkeypatch.setattr(pipe, "_generate_labels", boom)
    with pytest.raises(ValueError, match="decode_tile_size"):
        pipe.sample(1, seed=0, num_inference_steps=2, progress=False, decode_tile_size="huge")


# ---------------------------------------------------------------------------------------------- issue 14, fault 11
def test_default_decode_does_not_depend_on_free_memory(pipe, monkeypatch):
    """A busy GPU (faked: the free-memory query reports almost nothing) must not change the default decode.

    Before the fix, "auto" asked :func:`available_memory` and switched to tiles whose labels differ from the
    whole decode; now the query is never made and the output equals the whole decode exactly.
    """
    import duodiff.decoding as decoding

    common = dict(seed=3, num_inference_steps=2, progress=False)
    idle = pipe.sample(2, **common)
    whole = pipe.sample(2, decode_tile_size=None, **common)  # one batched call: equal up to float rounding
    calls = []

    def busy_gpu(device):
        calls.append(device)
        return estimate_decode_bytes(pipe.label_autoencoder, (16, 16, 16)) // 3  # would force tiles

    for module in (decoding, decoding.memory):  # the package's name and the defining module's
        monkeypatch.setattr(module, "available_memory", busy_gpu)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (1 << 20, 80 << 30))
    busy = pipe.sample(2, **common)
    assert calls == []
    assert torch.equal(busy.labels, idle.labels) and torch.equal(busy.images, idle.images)
    assert busy.decode == {"label": "whole", "image": "whole"} == whole.decode
    assert (busy.images - whole.images).abs().max() < 1e-4
    assert (busy.labels == whole.labels).float().mean() > 0.999


def test_decode_path_is_recorded_in_the_sample_and_the_saved_headers(pipe, tmp_path):
    import nibabel as nib

    tiled = pipe.sample(1, seed=3, num_inference_steps=2, progress=False, decode_tile_size=(16, 16, 8))
    assert tiled.decode == {"label": "tiled 16x16x8 overlap=0.25 halo=4", "image": "tiled 16x16x8 overlap=0.25 halo=4"}
    name = tiled.save(tmp_path)[0]
    for path in (tmp_path / "imagesTr" / f"{name}_0000.nii.gz", tmp_path / "labelsTr" / f"{name}.nii.gz"):
        descrip = nib.load(path).header["descrip"].item().decode()
        assert descrip == "duodiff seed=3 decode=tiled 16x16x8 overlap=0.25 halo=4"
    labels = torch.zeros((1, 1, 32, 32, 32), dtype=torch.long)
    out = pipe.generate_images(labels, seed=0, num_inference_steps=2, progress=False)
    assert out.decode == {"image": "whole"}


def test_whole_volume_out_of_memory_is_a_clear_memory_error(pipe, latents, monkeypatch):
    from duodiff.decoding import DecodeMemoryError

    def oom(z):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr(pipe.image_autoencoder, "decode", oom)
    with pytest.raises(DecodeMemoryError, match=r"one whole volume.*decode_tile_size=N") as info:
        decode(pipe.image_autoencoder, latents)
    assert isinstance(info.value, MemoryError)
    # the pipeline does not fall back to tiles (or retry smaller batches) behind the user's back
    with pytest.raises(DecodeMemoryError):
        pipe.sample(2, seed=0, num_inference_steps=2, progress=False)

"""Tiled-vs-whole decoding: the documented tolerance."""

from __future__ import annotations

from duodiff.decoding import seam_report

# Documented in docs/performance.md ("Tiled decoding"): default overlap (0.25) and halo (4), a 16^3
# latent cut in two along the last axis (tile (16, 16, 8)), randomly initialised tiny preset.
# Measured: image mean |diff| 0.008, label agreement 0.991; without the halo 0.058 and 0.919, so
# these bounds catch a broken halo. (Tiles along all three axes, (8, 8, 8): 0.018 and 0.981.)
IMAGE_MEAN_ABS_TOL = 0.03  # intensities in [0, 1]
LABEL_AGREEMENT_TOL = 0.95  # fraction of voxels with the same class


def test_tiled_image_decode_matches_whole_within_tolerance(pipe, big_latent):
    rep = seam_report(pipe.image_autoencoder, big_latent, tile_size=(16, 16, 8), kind="image")
    assert rep.tile_size == (16, 16, 8) and rep.overlap == 0.25 and rep.halo == 4
    assert 0 < rep.mean_abs_diff <= IMAGE_MEAN_ABS_TOL, rep
    assert rep.psnr_db is not None and rep.psnr_db > 25
    assert rep.label_agreement is None


def test_tiled_label_decode_matches_whole_within_tolerance(pipe, big_latent):
    rep = seam_report(pipe.label_autoencoder, big_latent, tile_size=(16, 16, 8), kind="label")
    assert rep.label_agreement is not None and rep.label_agreement >= LABEL_AGREEMENT_TOL, rep

"""Stage helpers: random patches."""

from __future__ import annotations

import torch


def test_random_patches_crop_every_tensor_alike_and_reproducibly():
    from duodiff.train.stages import random_patches

    x = torch.arange(2 * 8 * 10 * 12, dtype=torch.float32).reshape(2, 1, 8, 10, 12)
    y = x.clone().to(torch.uint8)
    a, b = random_patches((x, y), (4, 4, 8), torch.Generator().manual_seed(0))
    assert a.shape == (2, 1, 4, 4, 8) and torch.equal(a.to(torch.uint8), b)
    for i in range(2):  # each patch is a contiguous block of its own sample
        first = int(a[i, 0, 0, 0, 0])
        h, rest = divmod(first - i * 960, 120)
        w, d = divmod(rest, 12)
        assert torch.equal(a[i], x[i, :, h:h + 4, w:w + 4, d:d + 8])
    again, _ = random_patches((x, y), (4, 4, 8), torch.Generator().manual_seed(0))
    assert torch.equal(a, again)
    assert random_patches((x,), None, torch.Generator())[0] is x


def test_autoencoder_loss_picks_the_side_once_and_rejects_an_unknown_kind():
    """kind is resolved when the loss is built: the label loss is cross-entropy + Dice + KL of the one-hot labels,
    the image loss L1 + KL, and a kind that is neither is a ValueError naming it."""
    import pytest
    import torch.nn.functional as F
    from monai.networks.nets import AutoencoderKL

    from duodiff.train.loop import StepContext
    from duodiff.train.stages import AutoencoderStep, autoencoder_loss

    torch.manual_seed(0)
    ae = AutoencoderKL(spatial_dims=3, in_channels=3, out_channels=3, channels=(8, 8), num_res_blocks=(1, 1),
                       attention_levels=(False, False), latent_channels=2, norm_num_groups=4)
    labels = torch.randint(0, 3, (2, 1, 8, 8, 8), dtype=torch.uint8)
    kw = dict(num_classes=3, latent_shape=(2, 4, 4, 4), kl_weight=0.0, dice_weight=0.0, downsample_factor=2)
    ctx = StepContext(step=0, indices=torch.tensor([0, 1]), generator=torch.Generator().manual_seed(1),
                      device=torch.device("cpu"))
    loss, logs = autoencoder_loss(None, labels, kind="label", **kw)(AutoencoderStep(ae), ctx)
    assert set(logs) == {"ce", "dice", "kl"}
    g = torch.Generator().manual_seed(1)  # the same noise, by hand
    eps = torch.randn((2, 2, 4, 4, 4), generator=g)
    x = F.one_hot(labels[:, 0].long(), 3).movedim(-1, 1).float()
    with torch.no_grad():
        recon, _, _ = AutoencoderStep(ae)(x, eps)
    assert loss.item() == pytest.approx(F.cross_entropy(recon, labels[:, 0].long()).item(), rel=1e-5)
    with pytest.raises(ValueError, match="'mask'"):
        autoencoder_loss(None, labels, kind="mask", **kw)


def test_latent_noise_augmentation_draws_per_sample_levels_in_scaled_latent_units():
    """Off at 0; otherwise each sample's noise has its own level, bounded by latent_noise_std / scale_factor in the
    decoder's units, drawn reproducibly from the step generator; the image loss then decodes the noised latent."""
    import pytest
    from monai.networks.nets import AutoencoderKL

    from duodiff.train.loop import StepContext
    from duodiff.train.stages import AutoencoderStep, image_autoencoder_loss, latent_noise_augmentation

    def ctx(seed: int, n: int = 64) -> StepContext:
        return StepContext(step=0, indices=torch.arange(n), generator=torch.Generator().manual_seed(seed),
                           device=torch.device("cpu"))

    shape = (4, 6, 6, 6)
    assert latent_noise_augmentation(ctx(0), shape, 0.0, 2.0) is None
    noise = latent_noise_augmentation(ctx(0), shape, 0.5, 2.0)
    assert noise.shape == (64, *shape)
    std = noise.flatten(1).std(1)
    assert std.max() < 0.25 * 1.2 and std.min() < 0.05 and std.std() > 0.03  # U(0, 0.5 / 2) per sample
    assert torch.equal(noise, latent_noise_augmentation(ctx(0), shape, 0.5, 2.0))
    assert not torch.equal(noise, latent_noise_augmentation(ctx(1), shape, 0.5, 2.0))

    torch.manual_seed(0)
    ae = AutoencoderKL(spatial_dims=3, in_channels=1, out_channels=1, channels=(8, 8), num_res_blocks=(1, 1),
                       attention_levels=(False, False), latent_channels=2, norm_num_groups=4)
    images = torch.rand(2, 1, 8, 8, 8)
    kw = dict(latent_shape=(2, 4, 4, 4), kl_weight=0.0, scale_factor=1.0)
    step = AutoencoderStep(ae)
    with torch.no_grad():
        clean, _ = image_autoencoder_loss(images, **kw)(step, ctx(3, 2))
        noisy, _ = image_autoencoder_loss(images, latent_noise_std=5.0, **kw)(step, ctx(3, 2))
        g = torch.Generator().manual_seed(3)  # the loss draws the posterior noise, then the augmentation
        eps = torch.randn((2, 2, 4, 4, 4), generator=g)
        aug = latent_noise_augmentation(StepContext(0, torch.arange(2), g, torch.device("cpu")), (2, 4, 4, 4), 5.0,
                                        1.0)
        recon, _, _ = step(images, eps, False, aug)
    assert noisy.item() != pytest.approx(clean.item(), rel=1e-3)
    assert noisy.item() == pytest.approx((recon - images).abs().mean().item(), rel=1e-5)

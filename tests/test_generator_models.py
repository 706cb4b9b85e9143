"""The generator networks: RadsynthAutoencoder, its losses and metrics, and RadsynthUNet (tiny 2D and 3D configs)."""

from __future__ import annotations

import math

import pytest
import torch

from radsynth.generators.autoencoder import RadsynthAutoencoder, estimate_scaling_factor
from radsynth.generators.losses import PSNR_CAP_DB, AutoencoderLoss, kl_loss, reconstruction_metrics
from radsynth.generators.unet import RadsynthUNet

TINY_AE = dict(channels=(8, 16, 16), latent_channels=4, norm_num_groups=8)
TINY_UNET = dict(channels=(8, 16), attention_levels=(False, True), num_head_channels=8, cross_attention_dim=16,
                 norm_num_groups=8)
SAVED_FILES = {"config.json", "diffusion_pytorch_model.safetensors"}


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def images(batch: int, spatial_dims: int, side: int = 16) -> torch.Tensor:
    return torch.rand(batch, 1, *(side,) * spatial_dims) * 2 - 1


def blobs(batch: int = 4, side: int = 16) -> torch.Tensor:
    """Smooth Gaussian blobs in [-1, 1]: an image an autoencoder can learn in a few steps."""
    axis = torch.linspace(-1, 1, side)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    centres = torch.rand(batch, 2) - 0.5
    return torch.stack([torch.exp(-((xx - a) ** 2 + (yy - b) ** 2) / 0.2) * 2 - 1 for a, b in centres]).unsqueeze(1)


def text_tokens(batch: int, length: int = 5, dim: int = 16) -> torch.Tensor:
    return torch.randn(batch, length, dim)


@torch.no_grad()
def as_if_trained(unet: RadsynthUNet) -> RadsynthUNet:
    """MONAI zero-initialises the UNet's output and residual branches, so an untrained one predicts exactly 0
    whatever its conditioning; random values there stand in for training."""
    for parameter in unet.parameters():
        if not parameter.any():
            parameter.normal_(0.0, 0.2)
    return unet


def assert_saved_without_pickle(folder) -> None:
    names = {path.name for path in folder.iterdir()}
    assert names == SAVED_FILES, names


# ----------------------------------------------------------------------------------------------- autoencoder


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_autoencoder_shapes_downsample_four_times_per_axis(spatial_dims):
    autoencoder = RadsynthAutoencoder(spatial_dims=spatial_dims, **TINY_AE)
    x = images(2, spatial_dims)
    reconstruction, z_mu, z_sigma = autoencoder(x)
    latent_shape = (2, 4) + (4,) * spatial_dims
    assert autoencoder.downsample_factor == 4
    assert reconstruction.shape == x.shape
    assert z_mu.shape == z_sigma.shape == latent_shape
    assert bool((z_sigma > 0).all())
    with torch.no_grad():
        assert autoencoder.encode(x).shape == latent_shape
        assert autoencoder.decode(autoencoder.encode(x)).shape == x.shape


def test_autoencoder_round_trip_keeps_weights_and_scaling_factor(tmp_path):
    autoencoder = RadsynthAutoencoder(spatial_dims=2, **TINY_AE)
    autoencoder.set_scaling_factor(0.37)
    autoencoder.save_pretrained(tmp_path)
    assert_saved_without_pickle(tmp_path)

    torch.manual_seed(123)  # a different random init, so equal outputs prove the weights were loaded
    loaded = RadsynthAutoencoder.from_pretrained(tmp_path, use_safetensors=True)
    assert loaded.config.scaling_factor == pytest.approx(0.37)
    assert loaded.scaling_factor == pytest.approx(0.37)
    x = images(2, 2)
    latents = torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), autoencoder.encode(x))
        assert torch.equal(loaded.decode(latents), autoencoder.decode(latents))


def test_set_scaling_factor_rejects_non_positive_values():
    autoencoder = RadsynthAutoencoder(spatial_dims=2, **TINY_AE)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            autoencoder.set_scaling_factor(bad)
    assert autoencoder.scaling_factor == 1.0


@torch.no_grad()
def test_encode_and_decode_apply_the_scaling_factor_inversely():
    autoencoder = RadsynthAutoencoder(spatial_dims=2, **TINY_AE)
    autoencoder.set_scaling_factor(0.37)
    x = images(2, 2)
    z_mu, z_sigma = autoencoder.net.encode(x)
    latents = autoencoder.encode(x)
    torch.testing.assert_close(latents, 0.37 * z_mu)
    torch.testing.assert_close(autoencoder.decode(latents), autoencoder.net.decode(z_mu))

    first = autoencoder.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
    again = autoencoder.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, again)
    # A posterior draw scatters around the mean by sigma (in scaled units).
    standardised = (first - latents) / (0.37 * z_sigma)
    assert 0.7 < standardised.std().item() < 1.3


@torch.no_grad()
def test_estimate_scaling_factor_makes_latents_unit_std():
    autoencoder = RadsynthAutoencoder(spatial_dims=2, **TINY_AE)
    batches = [3 * images(3, 2) for _ in range(3)]
    unscaled = torch.cat([autoencoder.net.encode(batch)[0] for batch in batches])
    assert abs(math.log(unscaled.std().item())) > 0.2, "test needs latents whose std is not already ~1"

    factor = estimate_scaling_factor(autoencoder, (batch for batch in batches))
    autoencoder.set_scaling_factor(factor)
    scaled = torch.cat([autoencoder.encode(batch) for batch in batches])
    assert scaled.std(correction=0).item() == pytest.approx(1.0, abs=1e-5)
    # The batching does not matter: one batch of all images gives the same factor.
    assert estimate_scaling_factor(autoencoder, [torch.cat(batches)]) == pytest.approx(factor, rel=1e-6)
    with pytest.raises(ValueError):
        estimate_scaling_factor(autoencoder, [])


def test_short_training_on_a_fixed_batch_reduces_l1():
    autoencoder = RadsynthAutoencoder(spatial_dims=2, **TINY_AE)
    loss = AutoencoderLoss(kl_weight=1e-6)
    optimizer = torch.optim.Adam(autoencoder.parameters(), lr=1e-3)
    x = blobs()

    def mean_latent_l1() -> float:
        with torch.no_grad():
            return (autoencoder.decode(autoencoder.encode(x)) - x).abs().mean().item()

    before = mean_latent_l1()
    for _ in range(30):
        total, _ = loss.generator_loss(x, *autoencoder(x))
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    assert mean_latent_l1() < 0.6 * before


# ----------------------------------------------------------------------------------------------------- losses


def test_kl_loss_is_zero_for_the_prior_and_positive_otherwise():
    shape = (2, 4, 2, 2)
    zeros, ones = torch.zeros(shape), torch.ones(shape)
    assert kl_loss(zeros, ones).item() == pytest.approx(0.0, abs=1e-7)
    assert kl_loss(zeros + 0.5, ones).item() > 0
    assert kl_loss(zeros, ones * 2).item() > 0
    assert kl_loss(zeros, ones * 0.5).item() > 0
    # Summed over the 16 latent elements, averaged over the batch: 0.5 * mu^2 * 16 = 8 for mu = 1.
    assert kl_loss(ones, ones).item() == pytest.approx(8.0)


def test_autoencoder_loss_without_adversary_is_l1_plus_weighted_kl():
    loss = AutoencoderLoss(kl_weight=0.01, adversarial_weight=0.0, spatial_dims=2)
    assert loss.discriminator is None
    x, reconstruction = images(2, 2), images(2, 2)
    z_mu, z_sigma = torch.randn(2, 4, 4, 4), torch.rand(2, 4, 4, 4) + 0.5
    total, parts = loss.generator_loss(x, reconstruction, z_mu, z_sigma)
    l1 = (x - reconstruction).abs().mean()
    torch.testing.assert_close(total, l1 + 0.01 * kl_loss(z_mu, z_sigma))
    torch.testing.assert_close(parts["l1"], l1)
    assert parts["adv"].item() == 0.0
    assert loss.discriminator_loss(x, reconstruction) is None


def test_autoencoder_loss_with_adversary_trains_both_sides():
    autoencoder = RadsynthAutoencoder(spatial_dims=2, **TINY_AE)
    loss = AutoencoderLoss(kl_weight=1e-6, adversarial_weight=0.5, spatial_dims=2, discriminator_channels=8,
                           discriminator_layers=2)
    assert loss.discriminator is not None
    x = images(2, 2)
    reconstruction, z_mu, z_sigma = autoencoder(x)

    total, parts = loss.generator_loss(x, reconstruction, z_mu, z_sigma)
    assert parts["adv"].item() > 0
    expected = parts["l1"] + 1e-6 * parts["kl"] + 0.5 * parts["adv"]
    torch.testing.assert_close(total.detach(), expected)
    total.backward()
    assert all(p.grad is not None for p in autoencoder.parameters())

    autoencoder.zero_grad(set_to_none=True)
    loss.zero_grad(set_to_none=True)
    discriminator_loss = loss.discriminator_loss(x, reconstruction)
    assert discriminator_loss.ndim == 0 and discriminator_loss.item() > 0
    discriminator_loss.backward()
    assert all(p.grad is not None for p in loss.discriminator.parameters())
    # The reconstruction is detached for the discriminator: no gradient reaches the autoencoder.
    assert all(p.grad is None for p in autoencoder.parameters())


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_reconstruction_metrics_of_identical_images(spatial_dims):
    x = images(2, spatial_dims)
    metrics = reconstruction_metrics(x, x.clone(), intensity_low=-1000.0, intensity_high=1000.0)
    assert metrics["mae"] == 0.0
    assert metrics["psnr"] == PSNR_CAP_DB  # identical images: capped, not inf
    assert metrics["ssim"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("offset", [0.25, -0.5, 1.0])
def test_reconstruction_metrics_report_physical_units(offset):
    low, high = -1024.0, 3071.0  # a CT window in HU
    x = images(2, 2).double()
    metrics = reconstruction_metrics(x, x + offset, low, high)
    assert metrics["mae"] == pytest.approx(abs(offset) / 2 * (high - low), rel=1e-9)
    # A uniform error of |d|/2 of the range: PSNR = 20 log10(2 / |d|), whatever the range.
    assert metrics["psnr"] == pytest.approx(20 * math.log10(2 / abs(offset)), rel=1e-9)
    assert metrics["ssim"] < 0.99


# ------------------------------------------------------------------------------------------------------- UNet


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_unet_output_has_the_sample_shape(spatial_dims):
    unet = RadsynthUNet(spatial_dims=spatial_dims, **TINY_UNET)
    sample = torch.randn(2, 4, *(8,) * spatial_dims)
    with torch.no_grad():
        out = unet(sample, torch.tensor([10, 900]), text_tokens(2))
    assert out.shape == sample.shape
    assert torch.isfinite(out).all()


def test_unet_round_trip_keeps_outputs(tmp_path):
    unet = as_if_trained(RadsynthUNet(spatial_dims=3, num_class_embeds=3, use_spacing=True, **TINY_UNET))
    unet.save_pretrained(tmp_path)
    assert_saved_without_pickle(tmp_path)

    torch.manual_seed(123)
    loaded = RadsynthUNet.from_pretrained(tmp_path, use_safetensors=True)
    assert loaded.config.use_spacing and loaded.config.num_class_embeds == 3
    inputs = dict(sample=torch.randn(2, 4, 8, 8, 8), timestep=torch.tensor([5.0, 700.0]),
                  encoder_hidden_states=text_tokens(2), class_labels=torch.tensor([0, 2]),
                  spacing=torch.tensor([[1.0, 1.0, 1.5], [0.8, 0.8, 3.0]]))
    with torch.no_grad():
        expected = unet(**inputs)
        assert expected.abs().mean() > 0.01
        assert torch.equal(loaded(**inputs), expected)


@torch.no_grad()
def test_unet_spacing_token_is_used_only_when_enabled():
    sample, tokens = torch.randn(2, 4, 8, 8, 8), text_tokens(2)
    fine, coarse = torch.tensor([[1.0, 1.0, 1.0]] * 2), torch.tensor([[2.0, 2.0, 5.0]] * 2)

    with_spacing = as_if_trained(RadsynthUNet(spatial_dims=3, use_spacing=True, **TINY_UNET))
    assert with_spacing.conditioning_context(tokens, fine).shape == (2, 6, 16)
    out_fine = with_spacing(sample, 100, tokens, spacing=fine)
    assert not torch.allclose(out_fine, with_spacing(sample, 100, tokens, spacing=coarse))
    # One spacing for the whole batch broadcasts.
    assert torch.equal(out_fine, with_spacing(sample, 100, tokens, spacing=[1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="spacing"):
        with_spacing(sample, 100, tokens)
    with pytest.raises(ValueError, match="spacing"):
        with_spacing(sample, 100, tokens, spacing=torch.tensor([[1.0, 1.0]] * 2))

    without_spacing = as_if_trained(RadsynthUNet(spatial_dims=3, use_spacing=False, **TINY_UNET))
    assert without_spacing.conditioning_context(tokens, fine) is tokens
    reference = without_spacing(sample, 100, tokens)
    assert torch.equal(without_spacing(sample, 100, tokens, spacing=fine), reference)
    assert torch.equal(without_spacing(sample, 100, tokens, spacing=coarse), reference)


@torch.no_grad()
def test_unet_class_labels_condition_the_output():
    unet = as_if_trained(RadsynthUNet(spatial_dims=2, num_class_embeds=3, **TINY_UNET))
    sample, tokens = torch.randn(2, 4, 8, 8), text_tokens(2)
    out_a = unet(sample, 50, tokens, class_labels=torch.tensor([0, 1]))
    out_b = unet(sample, 50, tokens, class_labels=torch.tensor([2, 1]))
    assert not torch.allclose(out_a[0], out_b[0])
    torch.testing.assert_close(out_a[1], out_b[1])  # the unchanged label gives the unchanged prediction
    with pytest.raises(ValueError):
        unet(sample, 50, tokens)


@torch.no_grad()
def test_unet_accepts_float_and_scalar_timesteps():
    unet = as_if_trained(RadsynthUNet(spatial_dims=2, **TINY_UNET))
    sample, tokens = torch.randn(2, 4, 8, 8), text_tokens(2)
    integer = unet(sample, torch.tensor([500, 500]), tokens)
    torch.testing.assert_close(unet(sample, torch.tensor([500.0, 500.0]), tokens), integer)
    torch.testing.assert_close(unet(sample, 500.0, tokens), integer)
    torch.testing.assert_close(unet(sample, torch.tensor(500), tokens), integer)
    # Rectified flow feeds t * 1000, not an integer: fractional timesteps must change the prediction.
    assert not torch.allclose(unet(sample, torch.tensor([500.5, 500.5]), tokens), integer)
    with pytest.raises(ValueError, match="timestep"):
        unet(sample, torch.tensor([1, 2, 3]), tokens)

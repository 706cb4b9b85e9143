"""Autoencoder training losses and reconstruction metrics.

The objective follows the MONAI generative tutorials: L1 reconstruction + a small KL term, optionally an
adversarial term from a PatchGAN discriminator (sharper textures). There is no perceptual (LPIPS) term: its
weights would have to be downloaded, and nothing here downloads anything.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss
from monai.metrics import SSIMMetric
from monai.networks.nets import PatchDiscriminator
from torch import Tensor, nn

__all__ = ["kl_loss", "AutoencoderLoss", "reconstruction_metrics", "PSNR_CAP_DB"]

# PSNR of identical images is infinite; it is reported as this cap instead, so that logs and JSON stay finite.
# 100 dB means an RMS error of 1e-5 of the intensity range, far below any real reconstruction error.
PSNR_CAP_DB = 100.0


def kl_loss(z_mu: Tensor, z_sigma: Tensor) -> Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)), summed over latent channels and voxels, averaged over the batch."""
    per_element = z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2)) - 1.0
    return 0.5 * per_element.flatten(1).sum(dim=1).mean()


class AutoencoderLoss(nn.Module):
    """Generator and discriminator objectives of the autoencoder.

    With `adversarial_weight > 0` it owns a MONAI PatchDiscriminator (least-squares GAN), which the trainer
    optimises with its own optimizer on `discriminator_loss`. The generator pass also sends gradients into the
    discriminator's parameters: zero the discriminator's gradients before its step (as the MONAI tutorials do).
    """

    def __init__(
        self,
        kl_weight: float = 1e-6,
        adversarial_weight: float = 0.0,
        spatial_dims: int = 2,
        discriminator_channels: int = 32,
        discriminator_layers: int = 3,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        if kl_weight < 0 or adversarial_weight < 0:
            raise ValueError("kl_weight and adversarial_weight must be >= 0")
        self.kl_weight = float(kl_weight)
        self.adversarial_weight = float(adversarial_weight)
        self.discriminator: PatchDiscriminator | None = None
        if self.adversarial_weight > 0:
            # The first conv and all layers but the last halve the side, the last two convs take 1 off each: the
            # image side must be >= 3 * 2 ** discriminator_layers (24 for the default 3 layers).
            self.discriminator = PatchDiscriminator(
                spatial_dims=spatial_dims,
                num_layers_d=discriminator_layers,
                channels=discriminator_channels,
                in_channels=in_channels,
                out_channels=1,
            )
            self.adversarial = PatchAdversarialLoss(criterion="least_squares")

    def generator_loss(
        self, x: Tensor, reconstruction: Tensor, z_mu: Tensor, z_sigma: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """(total, {"l1", "kl", "adv"}): total = l1 + kl_weight * kl + adversarial_weight * adv.

        The parts are detached (for logging); "adv" is 0 without a discriminator.
        """
        l1 = F.l1_loss(reconstruction.float(), x.float())
        kl = kl_loss(z_mu.float(), z_sigma.float())
        total = l1 + self.kl_weight * kl
        adv = l1.new_zeros(())
        if self.discriminator is not None:
            logits_fake = self.discriminator(reconstruction.contiguous().float())[-1]
            adv = self.adversarial(logits_fake, target_is_real=True, for_discriminator=False)
            total = total + self.adversarial_weight * adv
        return total, {"l1": l1.detach(), "kl": kl.detach(), "adv": adv.detach()}

    def discriminator_loss(self, x: Tensor, reconstruction: Tensor) -> Tensor | None:
        """Least-squares loss of telling real images from (detached) reconstructions; None without a discriminator.

        Unweighted: the adversarial weight balances the generator's terms; the discriminator has only this one.
        """
        if self.discriminator is None:
            return None
        logits_fake = self.discriminator(reconstruction.detach().contiguous().float())[-1]
        logits_real = self.discriminator(x.detach().contiguous().float())[-1]
        loss_fake = self.adversarial(logits_fake, target_is_real=False, for_discriminator=True)
        loss_real = self.adversarial(logits_real, target_is_real=True, for_discriminator=True)
        return 0.5 * (loss_fake + loss_real)


def to_physical(values: Tensor, intensity_low: float, intensity_high: float) -> Tensor:
    """Invert the preprocessing map: [-1, 1] -> [low, high] (e.g. HU for CT)."""
    return (values + 1.0) / 2.0 * (intensity_high - intensity_low) + intensity_low


def ssim_window(spatial_shape: tuple[int, ...]) -> int:
    """Largest odd window that fits the image: 11 (the SSIM paper's) in 2D, 7 in 3D (11^3 kernels are slow)."""
    preferred = 11 if len(spatial_shape) == 2 else 7
    window = min(preferred, min(spatial_shape))
    return window if window % 2 == 1 else window - 1


@torch.no_grad()
def reconstruction_metrics(
    x: Tensor, reconstruction: Tensor, intensity_low: float, intensity_high: float
) -> dict[str, float]:
    """Batch-mean PSNR (dB), SSIM and MAE of reconstructions, in physical units.

    Both tensors are (B, C, *spatial) in [-1, 1] and are mapped back to [low, high] first, so MAE is in HU for
    CT. Values outside [-1, 1] are measured as they are (no clipping), so overshoot counts as error. PSNR uses
    data range high - low, per image, capped at PSNR_CAP_DB for identical images. SSIM is MONAI's (Gaussian
    window, sigma 1.5), its window shrunk to fit small images (>= 3 voxels per side needed).
    """
    if x.shape != reconstruction.shape:
        raise ValueError(f"shape mismatch: images {tuple(x.shape)} vs reconstructions {tuple(reconstruction.shape)}")
    if not intensity_high > intensity_low:
        raise ValueError(f"intensity_high ({intensity_high}) must exceed intensity_low ({intensity_low})")
    data_range = float(intensity_high - intensity_low)
    real = to_physical(x.detach().double(), intensity_low, intensity_high)
    fake = to_physical(reconstruction.detach().double(), intensity_low, intensity_high)

    mae = (real - fake).abs().mean().item()
    mse_per_image = (real - fake).pow(2).flatten(1).mean(dim=1)
    min_mse = (data_range * 10 ** (-PSNR_CAP_DB / 20)) ** 2
    psnr = (20 * math.log10(data_range) - 10 * torch.log10(mse_per_image.clamp_min(min_mse))).mean().item()

    spatial_shape = tuple(x.shape[2:])
    window = ssim_window(spatial_shape)
    if window < 3:
        raise ValueError(f"images of spatial shape {spatial_shape} are too small for SSIM (need >= 3 per side)")
    ssim_metric = SSIMMetric(spatial_dims=len(spatial_shape), data_range=data_range, win_size=window)
    ssim = ssim_metric(fake.float(), real.float()).mean().item()
    return {"psnr": psnr, "ssim": ssim, "mae": mae}

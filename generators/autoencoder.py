"""The latent autoencoder: MONAI's AutoencoderKL (2D or 3D) behind a diffusers-style config and save/load.

Images in [-1, 1] go in; the diffusion backbone works on `encode(x)`, the autoencoder's mean latent multiplied
by `scaling_factor` so that training latents have a standard deviation of about 1 (the noise schedules assume
unit-scale data). The factor is part of the model's config, so a saved autoencoder decodes its own latents.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.torch_utils import randn_tensor
from monai.networks.nets import AutoencoderKL
from torch import Tensor

__all__ = ["LatentCodec", "RadsynthAutoencoder", "estimate_scaling_factor"]


class LatentCodec:
    """What every radsynth codec (this autoencoder, a pretrained base's) gives the diffusion model: ``posterior``
    (mean and standard deviation in scaled latent units, what latent caches store), ``encode`` from it, ``decode``,
    ``downsample_factor``, ``latent_channels`` and ``scaling_factor``."""

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def encode(self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Scaled latents: the posterior mean, or with `sample=True` a draw from the posterior."""
        mean, std = self.posterior(x)
        if not sample:
            return mean
        return mean + std * randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)


class RadsynthAutoencoder(LatentCodec, ModelMixin, ConfigMixin):
    """KL-regularised autoencoder for 2D or 3D single-channel images; downsamples 2 ** (len(channels) - 1) per axis.

    `forward` is the training pass (sampled latent, reconstruction, posterior); `encode` / `decode` are the
    inference pair that the diffusion model sees, both in scaled latent units.
    """

    @register_to_config
    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: tuple[int, ...] = (32, 64, 64),
        latent_channels: int = 4,
        num_res_blocks: int = 1,
        attention_levels: tuple[bool, ...] = (False, False, False),
        norm_num_groups: int = 32,
        scaling_factor: float = 1.0,
    ) -> None:
        super().__init__()
        # The non-local (mid-block) attention is off: at 3D sizes its memory grows with the square of the latent
        # voxel count, and the diffusion UNet above supplies the global context.
        self.net = AutoencoderKL(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            channels=tuple(channels),
            latent_channels=latent_channels,
            num_res_blocks=num_res_blocks,
            attention_levels=tuple(attention_levels),
            norm_num_groups=norm_num_groups,
            with_encoder_nonlocal_attn=False,
            with_decoder_nonlocal_attn=False,
        )

    @property
    def downsample_factor(self) -> int:
        """Image side / latent side, per axis."""
        return 2 ** (len(self.config.channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.config.latent_channels)

    @property
    def scaling_factor(self) -> float:
        return float(self.config.scaling_factor)

    def set_scaling_factor(self, value: float) -> None:
        """Store the latent scale in the registered config, the one place save_pretrained reads it from."""
        value = float(value)
        if not value > 0 or value == float("inf"):
            raise ValueError(f"scaling_factor must be a positive finite number, got {value}")
        self.register_to_config(scaling_factor=value)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Training pass: (reconstruction of a sampled latent, z_mu, z_sigma), all unscaled."""
        return self.net(x)

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, standard deviation) of the latent posterior, in scaled latent units (what latent caches store)."""
        z_mu, z_sigma = self.net.encode(x)
        return z_mu * self.scaling_factor, z_sigma * self.scaling_factor

    def decode(self, latents: Tensor) -> Tensor:
        """Images from scaled latents (as produced by `encode` or by the diffusion sampler)."""
        return self.net.decode(latents / self.scaling_factor)


@torch.no_grad()
def estimate_scaling_factor(autoencoder: RadsynthAutoencoder, batches: Iterable[Tensor]) -> float:
    """1 / std of the unscaled posterior mean over all given image batches (one pass; batches may be a generator).

    The std is the population std over every latent element. Batch statistics are merged with Chan's parallel
    update (float64), so the result does not depend on how the images are split into batches.
    """
    count, mean, squared_deviations = 0, 0.0, 0.0
    for images in batches:
        images = images.to(device=autoencoder.device, dtype=autoencoder.dtype)
        z_mu = autoencoder.net.encode(images)[0].double()
        batch_count = z_mu.numel()
        if batch_count == 0:
            continue
        batch_mean = z_mu.mean().item()
        batch_squared_deviations = (z_mu - batch_mean).pow(2).sum().item()
        merged = count + batch_count
        delta = batch_mean - mean
        mean += delta * batch_count / merged
        squared_deviations += batch_squared_deviations + delta * delta * count * batch_count / merged
        count = merged
    if count == 0:
        raise ValueError("estimate_scaling_factor needs at least one non-empty batch of images")
    std = (squared_deviations / count) ** 0.5
    if not std > 0.0:
        raise ValueError("the latents have zero spread; cannot derive a scaling factor")
    return 1.0 / std

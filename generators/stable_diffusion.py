"""Stable-Diffusion-family components (a diffusers ``UNet2DConditionModel`` and ``AutoencoderKL``) as radsynth parts.

A pretrained SD-family base (Stable Diffusion 1.x / 2.x, RoentGen) is fine-tuned and sampled by radsynth's own
code: ``LatentDiffusion`` calls a denoiser as it calls ``RadsynthUNet`` and a codec as it calls
``RadsynthAutoencoder``. These two wrappers give the diffusers models those interfaces and nothing else; the
wrapped model is the base's own (``net``), built from the base's config, which the wrapper's config holds whole.

radsynth images are single-channel in [-1, 1]. The SD autoencoder was trained on RGB in [-1, 1]: a grey image
goes in as three equal channels, and the decoded channels are averaged back to one (an SD decoder given its own
grey latents decodes near-equal channels, so the average loses nothing it had).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor

from .autoencoder import LatentCodec

__all__ = ["StableDiffusionAutoencoder", "StableDiffusionUNet"]


def _wrapping(cls, argument: str, model: torch.nn.Module):
    """``cls`` around the pretrained ``model`` itself (its config as ``argument``): no second copy is built."""
    with torch.device("meta"):
        wrapped = cls(**{argument: {key: value for key, value in dict(model.config).items() if not key.startswith("_")}})
    wrapped.net = model
    return wrapped


class StableDiffusionUNet(ModelMixin, ConfigMixin):
    """An SD UNet called as radsynth's denoiser: ``(sample, timestep, encoder_hidden_states, class_labels=,
    spacing=, down_block_additional_residuals=, mid_block_additional_residual=) -> prediction``.

    It reads neither spacing (2D, one grid) nor classes (SD has no class embedding): a base's conditioning is its
    text. unet: the ``UNet2DConditionModel`` config (the base's ``unet/config.json``).
    """

    @register_to_config
    def __init__(self, unet: dict) -> None:
        super().__init__()
        self.net = UNet2DConditionModel.from_config(unet)

    @classmethod
    def from_diffusers(cls, model: UNet2DConditionModel) -> StableDiffusionUNet:
        return _wrapping(cls, "unet", model)

    def conditioning_context(self, encoder_hidden_states: Tensor, spacing: Tensor | Sequence[float] | None = None
                             ) -> Tensor:
        return encoder_hidden_states

    def forward(self, sample: Tensor, timestep: Tensor | float | int, encoder_hidden_states: Tensor,
                class_labels: Tensor | None = None, spacing: Tensor | Sequence[float] | None = None,
                down_block_additional_residuals: tuple[Tensor, ...] | None = None,
                mid_block_additional_residual: Tensor | None = None) -> Tensor:
        if class_labels is not None:
            raise ValueError("a Stable-Diffusion-family UNet has no class embedding: condition it on text")
        return self.net(sample, timestep, encoder_hidden_states,
                        down_block_additional_residuals=down_block_additional_residuals,
                        mid_block_additional_residual=mid_block_additional_residual, return_dict=False)[0]


class StableDiffusionAutoencoder(LatentCodec, ModelMixin, ConfigMixin):
    """An SD autoencoder as radsynth's codec for grey 2D images: ``encode`` / ``decode`` in scaled latent units,
    ``posterior`` for the latent cache. vae: the ``AutoencoderKL`` config (the base's ``vae/config.json``), whose
    ``scaling_factor`` is the base's."""

    @register_to_config
    def __init__(self, vae: dict) -> None:
        super().__init__()
        self.net = AutoencoderKL.from_config(vae)

    @classmethod
    def from_diffusers(cls, model: AutoencoderKL) -> StableDiffusionAutoencoder:
        return _wrapping(cls, "vae", model)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.net.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.net.config.latent_channels)

    @property
    def scaling_factor(self) -> float:
        return float(self.net.config.scaling_factor)

    def _rgb(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"images must be grey 2D, (B, 1, H, W), got {tuple(x.shape)}")
        return x.expand(-1, self.net.config.in_channels, -1, -1)

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        distribution = self.net.encode(self._rgb(x)).latent_dist
        return distribution.mean * self.scaling_factor, distribution.std * self.scaling_factor

    def decode(self, latents: Tensor) -> Tensor:
        images = self.net.decode(latents / self.scaling_factor, return_dict=False)[0]
        return images.mean(dim=1, keepdim=True)

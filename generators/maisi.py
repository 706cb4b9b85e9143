"""MONAI MAISI networks (MAISI v1 / v2, NV-Generate) as radsynth parts, built with MONAI's own classes.

``MaisiUNet`` calls ``DiffusionModelUNetMaisi`` as radsynth calls its denoiser and supplies MAISI's own
conditioning inputs, fixed per model: the voxel spacing (from each batch, as radsynth's 3D models read it), the
body region the volumes span (top and bottom region one-hot vectors) and the modality class, all scaled as MAISI's
inference scripts scale them (x 100). ``MaisiAutoencoder`` wraps ``AutoencoderKlMaisi`` as radsynth's codec: MAISI
images are in [0, 1] (CT: -1000..1000 HU), radsynth's in [-1, 1] (the same window), so the map between them is
linear and exact.

Conventions kept from MAISI: the rectified-flow UNet (v2) predicts clean - noise (MONAI's ``RFlowScheduler``),
radsynth's velocity is noise - clean, so its output is negated; the DDPM UNet (v1) predicts the noise as
radsynth's epsilon objective does. A MAISI UNet has no text cross-attention: prompts do not steer a MAISI base,
its conditioning is spacing, body region, modality and (through a ControlNet) label maps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi
from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi
from torch import Tensor

from .autoencoder import LatentCodec

__all__ = ["BODY_REGIONS", "INPUT_SCALE", "MaisiAutoencoder", "MaisiUNet", "body_region_vector"]

# MAISI's body regions, in the order of its region one-hot vectors.
BODY_REGIONS = ("head_neck", "chest", "abdomen", "lower_body")
INPUT_SCALE = 100.0  # MAISI feeds spacing (mm) and region one-hots to its UNet multiplied by this


def body_region_vector(region: str) -> list[float]:
    if region not in BODY_REGIONS:
        raise ValueError(f"body region must be one of {BODY_REGIONS}, got {region!r}")
    return [float(name == region) for name in BODY_REGIONS]


class MaisiUNet(ModelMixin, ConfigMixin):
    """MAISI's diffusion UNet as radsynth's denoiser.

    unet: ``DiffusionModelUNetMaisi``'s arguments (the bundle's ``diffusion_unet_def``); negate_output: True for a
    rectified-flow MAISI UNet (see the module docstring); top_region, bottom_region: the body regions the
    volumes start and end in (``BODY_REGIONS``), for a UNet built with region inputs; modality_class: the class
    index a UNet with class embeddings (NV-Generate's modality) is given.
    """

    @register_to_config
    def __init__(self, unet: dict, negate_output: bool = False, top_region: str | None = None,
                 bottom_region: str | None = None, modality_class: int | None = None) -> None:
        super().__init__()
        self.net = DiffusionModelUNetMaisi(**unet)
        regions = unet.get("include_top_region_index_input", False), unet.get("include_bottom_region_index_input", False)
        for included, name, value in zip(regions, ("top_region", "bottom_region"), (top_region, bottom_region)):
            if included and value is None:
                raise ValueError(f"this MAISI UNet reads the body region: give {name} (one of {BODY_REGIONS})")
        if unet.get("num_class_embeds") and modality_class is None:
            raise ValueError("this MAISI UNet reads a modality class: give modality_class")

    @property
    def uses_spacing(self) -> bool:
        """Whether batches must carry the voxel spacing (``LatentDiffusion.uses_spacing`` asks)."""
        return bool(self.config.unet.get("include_spacing_input", False))

    def conditioning_context(self, encoder_hidden_states: Tensor, spacing: Tensor | Sequence[float] | None = None
                             ) -> Tensor:
        return encoder_hidden_states

    def _region(self, name: str, batch: int, like: Tensor) -> Tensor | None:
        region = self.config[name]
        if region is None or not self.config.unet.get(f"include_{name}_index_input", False):
            return None
        vector = torch.tensor(body_region_vector(region), device=like.device, dtype=like.dtype) * INPUT_SCALE
        return vector.expand(batch, -1)

    def forward(self, sample: Tensor, timestep: Tensor | float | int, encoder_hidden_states: Tensor,
                class_labels: Tensor | None = None, spacing: Tensor | Sequence[float] | None = None,
                down_block_additional_residuals: tuple[Tensor, ...] | None = None,
                mid_block_additional_residual: Tensor | None = None) -> Tensor:
        batch = sample.shape[0]
        timesteps = torch.as_tensor(timestep, device=sample.device)
        timesteps = timesteps.reshape(1).expand(batch) if timesteps.numel() == 1 else timesteps
        modality = (None if self.config.modality_class is None else
                    torch.full((batch,), self.config.modality_class, device=sample.device, dtype=torch.long))
        spacing_input = None
        if self.uses_spacing:
            if spacing is None:
                raise ValueError("this MAISI UNet reads the voxel spacing: pass spacing (B, 3) in mm")
            spacing_input = torch.as_tensor(spacing, device=sample.device, dtype=sample.dtype).expand(batch, -1)
            spacing_input = spacing_input * INPUT_SCALE
        output = self.net(
            sample, timesteps, context=encoder_hidden_states if self.config.unet.get("with_conditioning") else None,
            class_labels=modality, down_block_additional_residuals=down_block_additional_residuals,
            mid_block_additional_residual=mid_block_additional_residual,
            top_region_index_tensor=self._region("top_region", batch, sample),
            bottom_region_index_tensor=self._region("bottom_region", batch, sample), spacing_tensor=spacing_input)
        return -output if self.config.negate_output else output


class MaisiAutoencoder(LatentCodec, ModelMixin, ConfigMixin):
    """MAISI's autoencoder as radsynth's codec (single-channel 3D images in [-1, 1]).

    autoencoder: ``AutoencoderKlMaisi``'s arguments (the bundle's ``autoencoder_def``); scaling_factor: the
    latent scale the MAISI diffusion model was trained with (its checkpoint's ``scale_factor``).
    """

    @register_to_config
    def __init__(self, autoencoder: dict, scaling_factor: float = 1.0) -> None:
        super().__init__()
        self.net = AutoencoderKlMaisi(**autoencoder)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.autoencoder["num_channels"]) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.config.autoencoder["latent_channels"])

    @property
    def scaling_factor(self) -> float:
        return float(self.config.scaling_factor)

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z_mu, z_sigma = self.net.encode((x + 1.0) / 2.0)
        return z_mu * self.scaling_factor, z_sigma * self.scaling_factor

    def decode(self, latents: Tensor) -> Tensor:
        return self.net.decode(latents / self.scaling_factor) * 2.0 - 1.0

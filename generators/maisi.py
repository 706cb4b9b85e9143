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

``MaisiControlNet`` wraps ``ControlNetMaisi``. MAISI's ControlNet reads a label map as the 8 bits of each voxel's
label index (0-255, its own vocabulary: ``label_dict.json``), not a one-hot; radsynth hands every ControlNet the
local vocabulary one-hot, so the wrapper maps each local label onto its MAISI index (``label_indices``) and
binarises, one matrix product: a local label keeps what the bundle's ControlNet learnt of the structure it is
mapped onto, and a new one takes a free index.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi
from monai.apps.generation.maisi.networks.controlnet_maisi import ControlNetMaisi
from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi
from torch import Tensor

from .autoencoder import LatentCodec
from .controlnet import control_input

__all__ = ["BODY_REGIONS", "INPUT_SCALE", "LABEL_BITS", "MaisiAutoencoder", "MaisiControlNet", "MaisiUNet",
           "body_region_vector"]

# MAISI's body regions, in the order of its region one-hot vectors.
BODY_REGIONS = ("head_neck", "chest", "abdomen", "lower_body")
INPUT_SCALE = 100.0  # MAISI feeds spacing (mm) and region one-hots to its UNet multiplied by this
LABEL_BITS = 8  # MAISI's ControlNet reads label indices 0..255 as 8 binary channels, lowest bit first
# What ControlNetMaisi builds when a bundle's controlnet_def leaves its label embedding's widths out.
_EMBEDDING_CHANNELS_DEFAULT = inspect.signature(ControlNetMaisi).parameters["conditioning_embedding_num_channels"].default


def body_region_vector(region: str) -> list[float]:
    if region not in BODY_REGIONS:
        raise ValueError(f"body region must be one of {BODY_REGIONS}, got {region!r}")
    return [float(name == region) for name in BODY_REGIONS]


def _modality_labels(modality_class: int | None, batch: int, device: torch.device) -> Tensor | None:
    """The modality class of every sample, for a network with class embeddings (None: it has none)."""
    return None if modality_class is None else torch.full((batch,), modality_class, device=device, dtype=torch.long)


def _per_sample(timestep: Tensor | float | int, batch: int, device: torch.device) -> Tensor:
    timesteps = torch.as_tensor(timestep, device=device)
    return timesteps.reshape(1).expand(batch) if timesteps.numel() == 1 else timesteps


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
        timesteps = _per_sample(timestep, batch, sample.device)
        modality = _modality_labels(self.config.modality_class, batch, sample.device)
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


class MaisiControlNet(ModelMixin, ConfigMixin):
    """MAISI's ControlNet beside a ``MaisiUNet``, fed radsynth's one-hot label maps.

    controlnet: ``ControlNetMaisi``'s arguments (the bundle's ``controlnet_def``); label_indices: the MAISI index
    (0-255) of each local label value, in order (``label_indices[0]`` is the background's, 0); modality_class: as
    the UNet's, for a ControlNet with class embeddings.
    """

    @register_to_config
    def __init__(self, controlnet: dict, label_indices: Sequence[int], modality_class: int | None = None) -> None:
        super().__init__()
        if controlnet.get("conditioning_embedding_in_channels") != LABEL_BITS:
            raise ValueError(f"a MAISI ControlNet reads {LABEL_BITS} label bits: conditioning_embedding_in_channels "
                             f"must be {LABEL_BITS}, got {controlnet.get('conditioning_embedding_in_channels')}")
        if len(label_indices) < 2 or any(not 0 <= index < 2**LABEL_BITS for index in label_indices):
            raise ValueError(f"label_indices needs the background and one label, each in 0..{2**LABEL_BITS - 1}, "
                             f"got {list(label_indices)}")
        if controlnet.get("num_class_embeds") and modality_class is None:
            raise ValueError("this MAISI ControlNet reads a modality class: give modality_class")
        self.net = ControlNetMaisi(**controlnet)
        indices = torch.tensor(list(label_indices))
        # (local labels, bits): row i is the binary code of local label i's MAISI index. Not saved: derived.
        self.register_buffer("codes", ((indices[:, None] >> torch.arange(LABEL_BITS)) & 1).float(), persistent=False)

    @property
    def num_labels(self) -> int:
        return len(self.config.label_indices)

    @property
    def downsample_factor(self) -> int:
        """How far the conditioning embedding brings the image-resolution map down: the latents' factor."""
        channels = self.config.controlnet.get("conditioning_embedding_num_channels",
                                              _EMBEDDING_CHANNELS_DEFAULT)
        return 2 ** (len(channels) - 1)

    def binary_labels(self, one_hot: Tensor) -> Tensor:
        """(B, num_labels, *spatial) one-hot local labels -> (B, 8, *spatial): MAISI's bits of their indices."""
        return torch.einsum("bl...,lk->bk...", one_hot, self.codes.to(one_hot.dtype))

    def forward(self, sample: Tensor, timestep: Tensor, context: Tensor, label_map: Tensor,
                conditioning_scale: float = 1.0, class_labels: Tensor | None = None) -> tuple[list[Tensor], Tensor]:
        """Residuals for the MAISI UNet, as ``RadsynthControlNet`` gives them. context and class_labels are
        radsynth's text and class conditioning, which a MAISI network does not read: its modality is fixed."""
        label_map = control_input(label_map, self.num_labels, self.downsample_factor, sample)
        batch = sample.shape[0]
        timesteps = _per_sample(timestep, batch, sample.device)
        modality = _modality_labels(self.config.modality_class, batch, sample.device)
        return self.net(sample, timesteps, controlnet_cond=self.binary_labels(label_map),
                        conditioning_scale=conditioning_scale,
                        context=context if self.config.controlnet.get("with_conditioning") else None,
                        class_labels=modality)

"""ControlNet over one-hot label maps, beside a frozen RadsynthUNet (MONAI's ControlNet, 2D or 3D).

The ControlNet is a trainable copy of the UNet's encoder. A label map enters as one channel per label of the
dataset's own vocabulary (any size: the one-hot is built on the fly, so 100+ classes cost memory, not code)
at image resolution; the conditioning embedding's stride-2 convolutions bring it down to latent resolution,
one per halving of the autoencoder. Its outputs are zero-initialised, so a new ControlNet leaves the base
model's predictions exactly as they were, and training moves away from there (Zhang & Agrawala 2023).

Wrapped as a diffusers ModelMixin/ConfigMixin so it saves and loads as a pipeline component. Do not save it
in a folder named ``controlnet``: diffusers mistakes such a folder for its own pipeline (see DESIGN.md).

Findings are a few latents of a map: ``ControlLossWeights`` weights the loss towards them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from monai.networks.nets import ControlNet
from torch import Tensor

from .unet import RadsynthUNet

__all__ = ["ControlLossWeights", "RadsynthControlNet", "control_input", "one_hot_labels", "rare_labels"]

# A label whose mean share of the training maps is under this is rare: a finding or a lesion, not an organ.
RARE_LABEL_SHARE = 0.01


def one_hot_labels(label_map: Tensor, num_labels: int) -> Tensor:
    """(B, 1, *spatial) or (B, *spatial) integer labels -> (B, num_labels, *spatial) float one-hot."""
    labels = label_map[:, 0] if label_map.ndim >= 3 and label_map.shape[1] == 1 else label_map
    labels = labels.long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_labels):
        raise ValueError(f"label values must lie in 0..{num_labels - 1}, found {int(labels.min())}..{int(labels.max())}")
    return F.one_hot(labels, num_labels).movedim(-1, 1).float()


def control_input(label_map: Tensor, num_labels: int, downsample_factor: int, latents: Tensor) -> Tensor:
    """A ControlNet's label map as one-hot floats in the latents' dtype, checked against the latents' grid:
    integer labels (B, 1, *image_shape) or one-hot (B, num_labels, *image_shape), image = latents x factor."""
    if not label_map.is_floating_point():
        label_map = one_hot_labels(label_map, num_labels)
    expected = tuple(size * downsample_factor for size in latents.shape[2:])
    if tuple(label_map.shape[2:]) != expected or label_map.shape[1] != num_labels:
        raise ValueError(f"label map must be (B, {num_labels}, *{expected}) for latents of shape "
                         f"{tuple(latents.shape)}, got {tuple(label_map.shape)}")
    return label_map.to(latents.dtype)


def rare_labels(label_maps: Tensor, num_labels: int) -> Tensor:
    """(num_labels,) booleans: the labels under ``RARE_LABEL_SHARE`` of the maps' voxels, (N, 1, *spatial)."""
    counts = torch.bincount(label_maps.reshape(-1).long(), minlength=num_labels)[:num_labels]
    return counts.double() / max(label_maps.numel(), 1) < RARE_LABEL_SHARE


@dataclass(frozen=True)
class ControlLossWeights:
    """Weights of the ControlNet's squared error on the latents: 1 + ``rare_weight`` x the share of rare labels
    under each latent voxel of the batch's own label maps.

    The weight reads the condition (the map), never the clean latents, so the loss's minimum (the image given its
    map) does not move; training only attends more to the few latents where a finding is drawn.
    rare: (num_labels,) booleans (``rare_labels``); factor: image voxels per latent voxel per axis.
    """

    rare: Tensor
    rare_weight: float
    factor: int

    def __call__(self, clean: Tensor, condition) -> Tensor:
        """Weights (B, 1, *latent grid) of a batch whose ``condition.control`` holds its one-hot maps."""
        shares = condition.control[:, self.rare.to(condition.control.device)].float().sum(dim=1, keepdim=True)
        pool = (F.avg_pool2d, F.avg_pool3d)[clean.ndim - 4]
        return 1.0 + self.rare_weight * pool(shares, self.factor)


class RadsynthControlNet(ModelMixin, ConfigMixin):
    """Label map (one-hot, image resolution) + noisy latents + text context -> residuals for the UNet."""

    @register_to_config
    def __init__(
        self,
        num_labels: int,
        downsample_factor: int = 4,
        spatial_dims: int = 2,
        in_channels: int = 4,
        channels: tuple[int, ...] = (64, 128, 128),
        attention_levels: tuple[bool, ...] = (False, True, True),
        num_res_blocks: int = 1,
        num_head_channels: int = 32,
        cross_attention_dim: int = 256,
        norm_num_groups: int = 32,
        num_class_embeds: int | None = None,
        embedding_channels: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        if num_labels < 2:
            raise ValueError(f"a label map needs at least 2 labels (background and one more), got {num_labels}")
        halvings = math.log2(downsample_factor)
        if downsample_factor < 1 or halvings != int(halvings):
            raise ValueError(f"downsample_factor must be a power of 2 (the autoencoder's), got {downsample_factor}")
        # One stride-2 block per halving, widening from 16 channels up to the UNet's first level.
        embedding_channels = tuple(embedding_channels or self.default_embedding_channels(int(halvings), channels[0]))
        if len(embedding_channels) != int(halvings) + 1:
            raise ValueError(f"embedding_channels needs {int(halvings) + 1} entries for a {downsample_factor}x "
                             f"autoencoder, got {len(embedding_channels)}")
        self.net = ControlNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            channels=tuple(channels),
            attention_levels=tuple(attention_levels),
            num_res_blocks=num_res_blocks,
            num_head_channels=num_head_channels,
            norm_num_groups=norm_num_groups,
            with_conditioning=True,
            cross_attention_dim=cross_attention_dim,
            num_class_embeds=num_class_embeds,
            conditioning_embedding_in_channels=num_labels,
            conditioning_embedding_num_channels=embedding_channels,
        )

    @property
    def num_labels(self) -> int:
        return self.config.num_labels

    @staticmethod
    def default_embedding_channels(halvings: int, last: int) -> tuple[int, ...]:
        return tuple(min(16 * 2**level, last) for level in range(halvings)) + (last,)

    @classmethod
    def from_unet(cls, unet: RadsynthUNet, num_labels: int, downsample_factor: int,
                  embedding_channels: Sequence[int] | None = None) -> RadsynthControlNet:
        """A ControlNet shaped like ``unet``'s encoder and starting from its weights (the trainable copy)."""
        unet_config = unet.config
        controlnet = cls(
            num_labels=num_labels, downsample_factor=downsample_factor, spatial_dims=unet_config.spatial_dims,
            in_channels=unet_config.in_channels, channels=tuple(unet_config.channels),
            attention_levels=tuple(unet_config.attention_levels), num_res_blocks=unet_config.num_res_blocks,
            num_head_channels=unet_config.num_head_channels, cross_attention_dim=unet_config.cross_attention_dim,
            norm_num_groups=unet_config.norm_num_groups, num_class_embeds=unet_config.num_class_embeds,
            embedding_channels=tuple(embedding_channels) if embedding_channels else None,
        )
        # Time embedding, class embedding, conv_in, down and middle blocks share MONAI's names; the decoder's
        # weights have no place here and the ControlNet's own (embedding, zero convolutions) keep their init.
        missing, unexpected = controlnet.net.load_state_dict(unet.net.state_dict(), strict=False)
        copied = set(controlnet.net.state_dict()) - set(missing)
        if not any(name.startswith("down_blocks.") for name in copied):
            raise ValueError("no encoder weights matched: is this UNet shaped like the ControlNet?")
        return controlnet.to(unet.device)

    def forward(
        self,
        sample: Tensor,
        timestep: Tensor,
        context: Tensor,
        label_map: Tensor,
        conditioning_scale: float = 1.0,
        class_labels: Tensor | None = None,
    ) -> tuple[list[Tensor], Tensor]:
        """Residuals (down blocks, middle block) to add inside the UNet, scaled by ``conditioning_scale``.

        context: the UNet's cross-attention context (``RadsynthUNet.conditioning_context``: text, plus the
        spacing token when the UNet uses one), so both networks attend to the same thing.
        label_map: integer labels (B, 1, *image_shape), or an already one-hot float (B, num_labels, ...).
        """
        label_map = control_input(label_map, self.num_labels, self.config.downsample_factor, sample)
        timesteps = torch.as_tensor(timestep, device=sample.device)
        if timesteps.ndim == 0 or timesteps.numel() == 1:
            timesteps = timesteps.reshape(1).expand(sample.shape[0])
        return self.net(sample, timesteps, controlnet_cond=label_map,
                        conditioning_scale=conditioning_scale, context=context, class_labels=class_labels)

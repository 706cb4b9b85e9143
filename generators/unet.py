"""The diffusion backbone: MONAI's DiffusionModelUNet (2D or 3D) with cross-attention to text tokens.

Wrapped as a diffusers ModelMixin/ConfigMixin so that it saves and loads as a pipeline component. Optional
conditionings sit on top of the text: class labels (added to the timestep embedding, MONAI's mechanism), the
voxel spacing, which becomes one extra context token so a 3D model trained on mixed resolutions knows the
physical size of a voxel, and the augmentation label of a training case (``augmentation.LatentAugment``), one
more token, zero (no transform) whenever none is given. A UNet built with ``label_channels`` also reads a label
map: its one-hot shares, averaged over each latent voxel's image voxels, are concatenated to the latents
(concatenation conditioning, as Konz et al. 2024's segmentation-guided diffusion); no map reads as all zeros,
which no one-hot map is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from monai.networks.nets import DiffusionModelUNet
from torch import Tensor, nn

__all__ = ["RadsynthUNet", "SpacingEmbedding", "TokenEmbedding"]


class TokenEmbedding(nn.Module):
    """A vector (B, features) -> one context token (B, 1, dim).

    The final LayerNorm puts the token on the scale of text-encoder outputs (which end in a LayerNorm too), so
    neither dominates the attention logits.
    """

    def __init__(self, features: int, dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(features, dim), nn.SiLU(), nn.Linear(dim, dim), nn.LayerNorm(dim))

    def forward(self, values: Tensor) -> Tensor:
        return self.mlp(values.to(self.mlp[0].weight.dtype)).unsqueeze(1)


class SpacingEmbedding(TokenEmbedding):
    """Voxel spacing (B, spatial_dims) in mm -> one context token; the log makes 0.5 mm and 2 mm symmetric
    around 1 mm."""

    def forward(self, spacing: Tensor) -> Tensor:
        return super().forward(torch.log(spacing))


class RadsynthUNet(ModelMixin, ConfigMixin):
    """Noise/velocity predictor on (scaled) latents, conditioned on text tokens via cross-attention."""

    @register_to_config
    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 4,
        out_channels: int = 4,
        channels: tuple[int, ...] = (64, 128, 128),
        attention_levels: tuple[bool, ...] = (False, True, True),
        num_res_blocks: int = 1,
        num_head_channels: int = 32,
        cross_attention_dim: int = 256,
        norm_num_groups: int = 32,
        num_class_embeds: int | None = None,
        use_spacing: bool = False,
        augment_dims: int = 0,
        label_channels: int = 0,
    ) -> None:
        super().__init__()
        self.net = DiffusionModelUNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels + label_channels,
            out_channels=out_channels,
            channels=tuple(channels),
            attention_levels=tuple(attention_levels),
            num_res_blocks=num_res_blocks,
            num_head_channels=num_head_channels,
            norm_num_groups=norm_num_groups,
            with_conditioning=True,
            cross_attention_dim=cross_attention_dim,
            num_class_embeds=num_class_embeds,
        )
        self.spacing_embedding = SpacingEmbedding(spatial_dims, cross_attention_dim) if use_spacing else None
        self.augment_embedding = TokenEmbedding(augment_dims, cross_attention_dim) if augment_dims else None

    def conditioning_context(
        self, encoder_hidden_states: Tensor, spacing: Tensor | Sequence[float] | None = None,
        augment: Tensor | None = None,
    ) -> Tensor:
        """The cross-attention context: the text tokens, plus the spacing token when the model uses spacing and
        the augmentation token when it was trained with augmentation (``augment`` (B, augment_dims); None: zero,
        no transform, what sampling asks for).

        Public so that a ControlNet beside this UNet can attend to exactly the same context.
        """
        tokens = [encoder_hidden_states]
        if self.spacing_embedding is not None:
            tokens.append(self._spacing_token(encoder_hidden_states, spacing))
        if self.augment_embedding is not None:
            batch = encoder_hidden_states.shape[0]
            if augment is None:
                augment = encoder_hidden_states.new_zeros(batch, self.config.augment_dims)
            if augment.shape != (batch, self.config.augment_dims):
                raise ValueError(f"augment must have shape ({batch}, {self.config.augment_dims}), "
                                 f"got {tuple(augment.shape)}")
            tokens.append(self.augment_embedding(augment).to(encoder_hidden_states.dtype))
        return torch.cat(tokens, dim=1) if len(tokens) > 1 else encoder_hidden_states

    def _spacing_token(self, encoder_hidden_states: Tensor, spacing: Tensor | Sequence[float] | None) -> Tensor:
        if spacing is None:
            raise ValueError("this UNet was built with use_spacing=True: pass spacing (B, spatial_dims) in mm")
        batch = encoder_hidden_states.shape[0]
        spacing = torch.as_tensor(spacing, device=encoder_hidden_states.device, dtype=torch.float32)
        if spacing.ndim == 1:
            spacing = spacing.expand(batch, -1)
        if spacing.shape != (batch, self.config.spatial_dims) or not bool((spacing > 0).all()):
            raise ValueError(
                f"spacing must be positive with shape ({batch}, {self.config.spatial_dims}) or "
                f"({self.config.spatial_dims},), got {tuple(spacing.shape)}"
            )
        return self.spacing_embedding(spacing).to(encoder_hidden_states.dtype)

    def forward(
        self,
        sample: Tensor,
        timestep: Tensor | float | int,
        encoder_hidden_states: Tensor,
        class_labels: Tensor | None = None,
        spacing: Tensor | Sequence[float] | None = None,
        augment: Tensor | None = None,
        down_block_additional_residuals: tuple[Tensor, ...] | None = None,
        mid_block_additional_residual: Tensor | None = None,
        label_map: Tensor | None = None,
    ) -> Tensor:
        """Prediction of sample's shape.

        timestep: a scalar or a (B,) tensor; floats are kept as they are (rectified flow passes t * 1000).
        spacing: (B, spatial_dims) or (spatial_dims,) in mm; read only when the model was built with use_spacing.
        augment: (B, augment_dims) augmentation labels; read only when built with augment_dims (None: zero).
        The two residual arguments are the ControlNet hooks of MONAI's UNet, passed through unchanged.
        label_map: one-hot floats (B, label_channels, *image grid), the image grid a whole multiple of the latents';
            read only when built with label_channels (None: no map).
        """
        batch = sample.shape[0]
        timesteps = torch.as_tensor(timestep, device=sample.device)
        if timesteps.ndim == 0 or timesteps.numel() == 1:
            # MONAI's sinusoidal embedding needs one timestep per batch element.
            timesteps = timesteps.reshape(1).expand(batch)
        if timesteps.shape != (batch,):
            raise ValueError(f"timestep must be a scalar or have shape ({batch},), got {tuple(timesteps.shape)}")
        context = self.conditioning_context(encoder_hidden_states, spacing, augment)
        if self.config.label_channels:
            sample = torch.cat([sample, self.label_shares(label_map, sample)], dim=1)
        return self.net(
            sample,
            timesteps,
            context=context,
            class_labels=class_labels,
            down_block_additional_residuals=down_block_additional_residuals,
            mid_block_additional_residual=mid_block_additional_residual,
        )

    def label_shares(self, label_map: Tensor | None, sample: Tensor) -> Tensor:
        """Each label's share of every latent voxel's image voxels (B, label_channels, *latent grid); zeros without a
        map."""
        batch, grid = sample.shape[0], tuple(sample.shape[2:])
        if label_map is None:
            return sample.new_zeros(batch, self.config.label_channels, *grid)
        factor = label_map.shape[-1] // grid[-1]
        if (tuple(label_map.shape[:2]) != (batch, self.config.label_channels) or factor < 1
                or tuple(label_map.shape[2:]) != tuple(size * factor for size in grid)):
            raise ValueError(f"label_map must be one-hot (B={batch}, {self.config.label_channels}, *grid) on a whole "
                             f"multiple of the latent grid {grid}, got {tuple(label_map.shape)}")
        pool = (F.avg_pool2d, F.avg_pool3d)[len(grid) - 2]
        return pool(label_map.float(), factor).to(sample.dtype)

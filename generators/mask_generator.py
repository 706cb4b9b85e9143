"""The mask generator: a diffusion model over label maps, so an image + label pair needs no existing mask.

A label map becomes one channel per label, average-pooled by ``downsample`` per axis: each coarse voxel holds
the share of every label inside it, so a thin wall or a 3-voxel nodule survives as a fraction instead of
vanishing, and the shares are mapped to [-1, 1] (the range the sampler's clip keeps). A RadsynthUNet denoises
these maps under the base model's own text context (its text encoder, frozen), so "liver tumour" in a prompt
draws a tumour in the map, and classifier-free guidance works as it does for images.

A generated map goes back to the image grid by interpolating the shares (bi/trilinear) and taking the largest
per voxel: boundaries come out smooth rather than blocky, and the map lands on exactly the grid the
ControlNet and the image use. An optional Gaussian on the interpolated shares (``smoothing_sigma``, image
voxels) rounds boundaries further; it is off by default, since at sigma 1 it erases structures a few voxels
thick (kidneys and vertebrae of a 48^3 torso keep a Dice of 0.1-0.4 against 0.6-0.8 without it).

Findings are a rounding error of a plain squared error: on the demo's chest maps a consolidation is 0.3% of the
share map and, trained so, the generator drew none in 64 maps (half of whose prompts asked for one).
``LabelLossWeights`` weights the loss towards rare labels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from monai.networks.layers import GaussianFilter
from torch import Tensor

from .controlnet import RARE_LABEL_SHARE, one_hot_labels
from .unet import RadsynthUNet

__all__ = ["LabelLossWeights", "RadsynthMaskGenerator"]

# The largest per-label weight: the demo's 4-pixel nodules would otherwise weigh 60 times the background.
MAX_LABEL_WEIGHT = 20.0


class RadsynthMaskGenerator(ModelMixin, ConfigMixin):
    """Denoiser of label-share maps on a grid ``downsample`` times coarser than ``image_shape``.

    label_names: the dataset's vocabulary, value -> name (JSON keys are strings); values run 0..max.
    orientation: where patient-right and superior lie on the grid (``masks.Orientation`` fields), for lesion
        requests on generated maps; None: the built-in phantoms' layout.
    Other arguments shape the RadsynthUNet, as the base model's do.
    """

    @register_to_config
    def __init__(
        self,
        label_names: Mapping[str, str],
        image_shape: Sequence[int],
        downsample: int = 2,
        smoothing_sigma: float = 0.0,
        spatial_dims: int = 2,
        channels: tuple[int, ...] = (32, 64, 128),
        attention_levels: tuple[bool, ...] = (False, False, True),
        num_res_blocks: int = 1,
        num_head_channels: int = 32,
        cross_attention_dim: int = 256,
        norm_num_groups: int = 16,
        num_class_embeds: int | None = None,
        use_spacing: bool = False,
        orientation: Mapping[str, int | bool] | None = None,
    ) -> None:
        super().__init__()
        values = sorted(int(value) for value in label_names)
        if len(values) < 2 or values[0] != 0:
            raise ValueError(f"label_names needs background 0 and at least one label, got {dict(label_names)}")
        if len(image_shape) != spatial_dims or any(size % downsample for size in image_shape):
            raise ValueError(f"image_shape {tuple(image_shape)} must have {spatial_dims} sizes divisible by "
                             f"downsample {downsample}")
        self.num_labels = values[-1] + 1
        self.denoiser = RadsynthUNet(
            spatial_dims=spatial_dims, in_channels=self.num_labels, out_channels=self.num_labels,
            channels=tuple(channels), attention_levels=tuple(attention_levels), num_res_blocks=num_res_blocks,
            num_head_channels=num_head_channels, cross_attention_dim=cross_attention_dim,
            norm_num_groups=norm_num_groups, num_class_embeds=num_class_embeds, use_spacing=use_spacing)

    @property
    def grid_shape(self) -> tuple[int, ...]:
        return tuple(size // self.config.downsample for size in self.config.image_shape)

    @property
    def label_vocabulary(self) -> dict[int, str]:
        return {int(value): name for value, name in self.config.label_names.items()}

    def conditioning_context(self, encoder_hidden_states: Tensor, spacing: Tensor | None = None) -> Tensor:
        return self.denoiser.conditioning_context(encoder_hidden_states, spacing)

    def encode(self, label_maps: Tensor) -> Tensor:
        """Integer maps (B, 1, *image_shape) -> label shares on the coarse grid in [-1, 1], (B, L, *grid_shape)."""
        expected = tuple(self.config.image_shape)
        if tuple(label_maps.shape[2:]) != expected:
            raise ValueError(f"label maps must be (B, 1, *{expected}), got {tuple(label_maps.shape)}")
        shares = one_hot_labels(label_maps, self.num_labels)
        pool = (F.avg_pool2d, F.avg_pool3d)[self.config.spatial_dims - 2]
        return pool(shares, self.config.downsample) * 2.0 - 1.0

    def decode(self, coarse: Tensor) -> Tensor:
        """Label shares (B, L, *grid_shape) in [-1, 1] -> integer label maps (B, 1, *image_shape), int64."""
        shares = ((coarse.float() + 1.0) / 2.0).clamp(0.0, 1.0)
        mode = ("bilinear", "trilinear")[self.config.spatial_dims - 2]
        shares = F.interpolate(shares, size=tuple(self.config.image_shape), mode=mode, align_corners=False)
        if self.config.smoothing_sigma > 0:
            smoothing = GaussianFilter(self.config.spatial_dims, self.config.smoothing_sigma).to(shares.device)
            shares = smoothing(shares)
        return shares.argmax(dim=1, keepdim=True)

    def forward(self, sample: Tensor, timestep: Tensor | float | int, encoder_hidden_states: Tensor,
                class_labels: Tensor | None = None, spacing: Tensor | Sequence[float] | None = None) -> Tensor:
        """The denoiser's prediction for noisy label shares (the signature of ``RadsynthUNet.forward``)."""
        return self.denoiser(sample, timestep, encoder_hidden_states, class_labels=class_labels, spacing=spacing)


@dataclass(frozen=True)
class LabelLossWeights:
    """Weights of the mask generator's squared error towards rare labels, built from the training shares.

    - per label: (the commonest label's mean share / this label's) ** ``balance``, at most ``MAX_LABEL_WEIGHT``.
      Every voxel of a label's channel gets the same weight, so the loss's minimum (each channel's conditional
      mean) does not move; only how much of training goes to it.
    - per voxel: 1 + ``rare_weight`` x the rare labels' shares there. This one moves the minimum: where the
      model is unsure, it draws the rare label, so findings come out larger as it grows.

    Measured on the demo's chest maps (1,679 training maps, 16x16 grid, batch 32; the real mean areas of
    consolidation, effusion and pneumothorax are 97, 85 and 194 pixels of 64x64), 8 maps per prompt:

    ======================  ======  =====================================================================
    (balance, rare_weight)  steps   the finding asked for
    ======================  ======  =====================================================================
    (0, 0) or (0.5, 0)      600     never drawn (nor in 1,000 steps unweighted)
    (0, 3)                  600     consolidation 85 px in 8 of 8; effusion 5 px; pneumothorax 34 px
    (0.5, 3)                600     in 23 of 24 maps: 46, 48 and 107 px
    (0.5, 30)               600     617, 425 and 1,174 px
    (0.5, 1)                1,000   in 20 of 24 maps: 27, 31 and 51 px
    (0.5, 2)                1,000   in 24 of 24 maps: 131, 175 and 273 px (1.4x, 2x, 1.4x real)
    (0.5, 3)                1,000   in 24 of 24 maps: 194, 172 and 326 px
    ======================  ======  =====================================================================

    With 1,000 steps no "finding: none" map held a finding label. No setting drew the demo's nodules (4 pixels at
    the median, below what a 16x16 grid of shares draws).
    """

    per_label: torch.Tensor  # (L,)
    rare: torch.Tensor  # (L,) bool
    rare_weight: float

    @classmethod
    def from_shares(cls, shares: torch.Tensor, balance: float, rare_weight: float) -> LabelLossWeights:
        """shares: the training maps as ``RadsynthMaskGenerator.encode`` gives them, (N, L, *grid) in [-1, 1]."""
        frequency = ((shares.float() + 1.0) / 2.0).mean(dim=[d for d in range(shares.ndim) if d != 1])
        per_label = (frequency.max() / frequency.clamp_min(1e-12)).pow(balance).clamp(max=MAX_LABEL_WEIGHT)
        return cls(per_label, frequency < RARE_LABEL_SHARE, rare_weight)

    def __call__(self, clean: torch.Tensor, condition: object = None) -> torch.Tensor:
        """Weights (B, L, *grid) of a batch's clean shares (B, L, *grid); the condition does not enter."""
        per_label = self.per_label.to(clean.device).view(1, -1, *[1] * (clean.ndim - 2))
        rare_share = ((clean[:, self.rare.to(clean.device)].float() + 1.0) / 2.0).sum(dim=1, keepdim=True)
        return per_label * (1.0 + self.rare_weight * rare_share)

"""F0: a randomly initialised CNN with a fixed seed, the sanity baseline among the feature spaces.

Random convolutional features already separate blurry, noisy or shifted image sets; a metric that looks
good in F0 but bad in the learned spaces (or the reverse) points at the feature space, not the images.
No normalisation layers at all: nothing can depend on the batch, and evaluation is plain convolutions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.networks.blocks import Convolution
from torch import nn

from .base import check_images, chunks

__all__ = ["RandomCNNFeatures"]


class RandomCNNFeatures:
    """Global average and max pooling of every stage of a random strided CNN, concatenated.

    spatial_dims: 2 or 3. seed: fixes the weights; the same seed gives the same features in any process.
    channels: output channels per stage; each stage halves the grid. F = 2 * sum(channels).
    """

    name = "random_cnn"

    def __init__(self, spatial_dims: int, seed: int = 0, channels: Sequence[int] = (16, 32, 64, 128),
                 device: str | torch.device = "cpu"):
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.spatial_dims = spatial_dims
        self.seed = seed
        self.channels = tuple(int(c) for c in channels)
        self.device = torch.device(device)
        self.stages = self._build().to(self.device).eval()

    def _build(self) -> nn.ModuleList:
        stages = nn.ModuleList()
        inputs = 1
        with torch.random.fork_rng(devices=[]):  # the layers' default init must not advance the caller's RNG
            for width in self.channels:
                stages.append(Convolution(self.spatial_dims, inputs, width, strides=2, kernel_size=3, norm=None,
                                          act=("leakyrelu", {"negative_slope": 0.2})))
                inputs = width
        # Weights drawn from a private seeded generator. He-normal weights keep the activation scale roughly
        # constant over depth, so late stages are not ~0.
        generator = torch.Generator().manual_seed(self.seed)
        for module in stages.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_normal_(module.weight, a=0.2, nonlinearity="leaky_relu", generator=generator)
                nn.init.zeros_(module.bias)
        return stages

    @property
    def num_features(self) -> int:
        return 2 * sum(self.channels)

    @property
    def feature_names(self) -> list[str]:
        return [f"stage{s}_{pool}{c}" for s, width in enumerate(self.channels) for pool in ("mean", "max")
                for c in range(width)]

    @torch.no_grad()
    def extract(self, images: np.ndarray, masks: np.ndarray | None = None, batch_size: int = 64) -> np.ndarray:
        """float64 (N, 2 * sum(channels)); ``masks`` are accepted for the common interface and ignored."""
        array = check_images(images, self.spatial_dims, "RandomCNNFeatures")
        rows = [self._features(torch.from_numpy(np.ascontiguousarray(array[part]))) for part in
                chunks(len(array), batch_size)]
        return np.concatenate(rows) if rows else np.zeros((0, self.num_features))

    def _features(self, batch: torch.Tensor) -> np.ndarray:
        x = batch.unsqueeze(1).to(self.device)
        pooled = []
        for stage in self.stages:
            x = stage(x)
            flat = x.flatten(2)
            pooled += [flat.mean(2), flat.amax(2)]
        return torch.cat(pooled, 1).double().cpu().numpy()

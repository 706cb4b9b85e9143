"""Strong, dimension-generic image augmentations in torch, for contrastive training and near-copy making.

SimCLR learns what survives these changes, so they define what the encoder treats as "the same image":
random resized crop, flips, small rotations and shifts (one affine resampling), blur, gamma / contrast /
brightness, gaussian noise and a cutout box. The privacy scorer reuses ``augment`` to make augmented near
copies of training images, so copy detection is calibrated against exactly the changes F2 is invariant to.
Every random number comes from the caller's generator: the same generator state gives the same views.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["augment"]


def augment(images: torch.Tensor, generator: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Independently augmented copies of channel-first ``images`` (N, C, H, W) or (N, C, D, H, W) on [-1, 1].

    Returns the same shape, float32, on [-1, 1]; all channels of a sample get the same transform.
    strength: scales every magnitude (crop area, aspect, rotation, blur, intensity changes, noise, cutout); 1 is
    SimCLR-strong, smaller values make nearer copies, 0 leaves only the random flips.
    """
    if images.ndim not in (4, 5):
        raise ValueError(f"augment: expected (N, C, H, W) or (N, C, D, H, W) images, got shape {tuple(images.shape)}")
    x = images.float()
    draw = _Draw(generator, images.shape[0], images.device)
    x = _resample(x, draw, strength)
    x = _blur(x, draw, strength)
    x = _intensity(x, draw, strength)
    x = _cutout(x, draw, strength)
    return x.clamp(-1.0, 1.0)


class _Draw:
    """Uniform random numbers of shape (n, *shape) in [low, high) from the caller's generator."""

    def __init__(self, generator: torch.Generator, n: int, device: torch.device):
        self.generator, self.n, self.device = generator, n, device

    def __call__(self, low: float, high: float, *shape: int) -> torch.Tensor:
        u = torch.rand((self.n, *shape), generator=self.generator, device=self.generator.device)
        return (low + (high - low) * u).to(self.device)

    def chance(self, probability: float) -> torch.Tensor:
        return self(0.0, 1.0) < probability


def _resample(x: torch.Tensor, draw: _Draw, strength: float) -> torch.Tensor:
    """Random resized crop + flips + small rotation as one affine map, resampled once (background -1 outside)."""
    n, dims = x.shape[0], x.ndim - 2
    area = draw(1.0 - 0.65 * strength, 1.0)
    log_aspect = draw(-0.5, 0.5, dims) * math.log(4.0 / 3.0) * strength
    extent = (area.clamp_min(1e-3) ** (1.0 / dims))[:, None] * torch.exp(log_aspect - log_aspect.mean(1, keepdim=True))
    extent = extent.clamp(max=1.0)
    centre = (draw(-1.0, 1.0, dims) * (1.0 - extent)).unsqueeze(-1)
    flips = torch.where(draw(0.0, 1.0, dims) < 0.5, -1.0, 1.0)
    rotation = torch.eye(dims, device=x.device).repeat(n, 1, 1)
    for a in range(dims):  # a small rotation in every plane of two axes
        for b in range(a + 1, dims):
            angle = draw(-1.0, 1.0) * math.radians(15.0) * strength
            plane = torch.eye(dims, device=x.device).repeat(n, 1, 1)
            plane[:, a, a], plane[:, b, b] = torch.cos(angle), torch.cos(angle)
            plane[:, a, b], plane[:, b, a] = -torch.sin(angle), torch.sin(angle)
            rotation = rotation @ plane
    theta = torch.cat([rotation * (extent * flips)[:, None, :], centre], dim=2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0


def _blur(x: torch.Tensor, draw: _Draw, strength: float) -> torch.Tensor:
    """Separable gaussian blur with a per-sample sigma (half the samples unblurred), as a grouped convolution."""
    n, channels, dims = x.shape[0], x.shape[1], x.ndim - 2
    max_sigma = 1.5 * strength
    if max_sigma <= 0.0:
        return x
    sigma = torch.where(draw.chance(0.5), draw(0.1, 1.0) * max_sigma, torch.full((n,), 1e-3, device=x.device))
    radius = max(1, math.ceil(3.0 * max_sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
    kernels = torch.exp(-0.5 * (offsets[None, :] / sigma[:, None]) ** 2)
    kernels = (kernels / kernels.sum(1, keepdim=True)).repeat_interleave(channels, dim=0)
    conv = (F.conv2d, F.conv3d)[dims - 2]
    y = x.reshape(1, n * channels, *x.shape[2:])  # one convolution group per sample and channel
    for axis in range(dims):
        shape = [n * channels, 1] + [1] * dims
        shape[2 + axis] = 2 * radius + 1
        padding = [0, 0] * dims
        padding[2 * (dims - 1 - axis)] = padding[2 * (dims - 1 - axis) + 1] = radius
        y = conv(F.pad(y, padding, mode="replicate"), kernels.reshape(shape), groups=n * channels)
    return y.reshape(x.shape)


def _intensity(x: torch.Tensor, draw: _Draw, strength: float) -> torch.Tensor:
    """Gamma on [0, 1], contrast about the image mean, brightness shift, then gaussian noise on half the samples."""
    n, dims = x.shape[0], x.ndim - 2
    view = (n,) + (1,) * (dims + 1)
    log_gamma = draw(-1.0, 1.0) * math.log(1.5) * strength
    unit = ((x + 1.0) / 2.0).clamp(0.0, 1.0) ** torch.exp(log_gamma).reshape(view)
    x = unit * 2.0 - 1.0
    mean = x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)
    x = (x - mean) * draw(1.0 - 0.3 * strength, 1.0 + 0.3 * strength).reshape(view) + mean
    x = x + draw(-0.2 * strength, 0.2 * strength).reshape(view)
    noise_sd = torch.where(draw.chance(0.5), draw(0.0, 0.08 * strength), torch.zeros(n, device=x.device))
    noise = torch.randn(x.shape, generator=draw.generator, device=draw.generator.device).to(x.device)
    return x + noise_sd.reshape(view) * noise


def _cutout(x: torch.Tensor, draw: _Draw, strength: float) -> torch.Tensor:
    """On half the samples, one box of 10-30% of each side (times strength) set to the sample's mean."""
    n, spatial = x.shape[0], x.shape[2:]
    apply = draw.chance(0.5) & (strength > 0)
    side = draw(0.1, 0.3, len(spatial)) * strength
    start = draw(0.0, 1.0, len(spatial)) * (1.0 - side)
    inside = torch.ones((n,) + tuple(spatial), dtype=torch.bool, device=x.device)
    for axis, length in enumerate(spatial):
        position = (torch.arange(length, device=x.device, dtype=torch.float32) + 0.5) / length
        low, high = start[:, axis, None], (start[:, axis] + side[:, axis])[:, None]
        along = (position[None, :] >= low) & (position[None, :] < high)
        shape = [n] + [1] * len(spatial)
        shape[1 + axis] = length
        inside &= along.reshape(shape)
    inside &= apply.reshape((n,) + (1,) * len(spatial))
    mean = x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)
    return torch.where(inside.unsqueeze(1), mean, x)

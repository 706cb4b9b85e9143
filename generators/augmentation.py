"""Non-leaking augmentation of training latents (Karras et al. 2022, EDM, appendix C.4), 2D or 3D.

On a small dataset a diffusion model learns its few training cases by heart. Showing it transformed copies
regularises it, but a model trained on flipped chests would draw flipped chests. EDM's remedy: tell the model
which transform each training case underwent (the *augmentation label*, one vector per case) and ask for none
at sampling (a zero label), so the transforms share the network's capacity without leaking into the samples.

The transforms act on the cached latents, not the images: they are cheap there (no re-encoding per step) and
the label, not the decoder, is what keeps them apart. Each is drawn independently with ``probability``:

- a flip of each spatial axis (label 1 where flipped);
- a quarter turn k in {1, 2, 3} in the plane of the last two axes, when those have the same size (label
  (cos(k pi/2) - 1, sin(k pi/2)): zero for no turn);
- an integer shift of each axis by up to ``max_shift`` of its size, reflected at the border (label: the shift
  as a fraction of the size).

Intensity transforms are not offered: a latent has no intensity axis to scale, and an image-space transform
would need the autoencoder on every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LatentAugment"]


@dataclass(frozen=True)
class LatentAugment:
    """Random geometric transforms of latents (B, C, *spatial) and their labels (B, ``label_dims``)."""

    probability: float
    flip: bool = True
    rotate: bool = True
    max_shift: float = 0.125

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {self.probability}")
        if not 0.0 <= self.max_shift < 0.5:
            raise ValueError(f"max_shift must be in [0, 0.5), got {self.max_shift}")

    @staticmethod
    def label_dims(spatial_dims: int) -> int:
        """Length of a label: a flip per axis, the quarter turn's (cos - 1, sin), a shift per axis."""
        return 2 * spatial_dims + 2

    def __call__(self, latents: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Each case transformed (or not) and its label. Draws from ``generator`` (on the CPU) the same number of
        values whatever is drawn, so a training step's later draws do not depend on the transforms chosen."""
        batch, spatial = latents.shape[0], latents.shape[2:]
        dims = len(spatial)
        chosen = torch.rand(batch, dims + 2, generator=generator) < self.probability  # flips, turn, shift
        turns = torch.randint(1, 4, (batch,), generator=generator)
        shift_fractions = (torch.rand(batch, dims, generator=generator) * 2 - 1) * self.max_shift
        can_turn = self.rotate and dims >= 2 and spatial[-1] == spatial[-2]
        out, labels = [], torch.zeros(batch, self.label_dims(dims))
        for i in range(batch):
            case = latents[i]
            for axis in range(dims):
                if self.flip and chosen[i, axis]:
                    case = case.flip(axis + 1)
                    labels[i, axis] = 1.0
            if can_turn and chosen[i, dims]:
                k = int(turns[i])
                case = torch.rot90(case, k, dims=(dims - 1, dims))
                labels[i, dims : dims + 2] = torch.tensor([math.cos(k * math.pi / 2) - 1, math.sin(k * math.pi / 2)])
            if self.max_shift and chosen[i, dims + 1]:
                shifts = [round(float(f) * n) for f, n in zip(shift_fractions[i], spatial)]
                case = reflect_shift(case, shifts)
                labels[i, dims + 2 :] = torch.tensor([s / n for s, n in zip(shifts, spatial)])
            out.append(case)
        return torch.stack(out), labels.to(device=latents.device, dtype=latents.dtype)


def reflect_shift(case: Tensor, shifts: list[int]) -> Tensor:
    """``case`` (C, *spatial) moved by ``shifts`` voxels per axis; what enters at a border is its mirror image
    (no seam, unlike a circular roll). Each shift must be smaller than its axis."""
    for axis, shift in enumerate(shifts, start=1):
        n = case.shape[axis]
        if not shift:
            continue
        if abs(shift) >= n:
            raise ValueError(f"shift {shift} must be smaller than the axis ({n})")
        source = (torch.arange(n) - shift).abs()  # below 0: mirrored at the first voxel
        source = torch.where(source > n - 1, 2 * (n - 1) - source, source)  # past the end: mirrored at the last
        case = case.index_select(axis, source.to(case.device))
    return case

"""The sets a scorecard compares: synthetic samples, the training images, unseen real images.

Every scorer takes ``ImageSet`` objects (or their arrays). All sets of one scoring run share one intensity
mapping onto [-1, 1] and one grid, so a pixel or feature difference is a difference of content.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from radsynth.pipelines.data.preprocess import IntensityMap


@dataclass
class ImageSet:
    """N images on one grid with what is known about each.

    images: float32 (N, *spatial) in [-1, 1] (the model's scale; ``intensity.inverse`` gives physical units).
    ids: one id per image (case id or sample id), unique.
    groups: bootstrap unit per image: the patient id of a real image, the sample's own id for a synthetic one.
    spacing: voxel size in mm per spatial axis.
    masks: integer label maps (N, *spatial), 0 = background, or None.
    conditions: per image, the prompt attributes it was generated for (synthetic) or has (real); may be empty.
    sources: per synthetic image, what it was read from: the sha256 of its image, label map and sidecar and the
        model hash its sidecar names (what a release checks before publishing it); empty for real images.
    """

    images: np.ndarray
    ids: list[str]
    groups: list[str]
    spacing: tuple[float, ...]
    intensity: IntensityMap
    is_synthetic: bool
    masks: np.ndarray | None = None
    conditions: list[dict[str, str]] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    name: str = ""
    sources: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.images)
        if len(self.ids) != n or len(self.groups) != n:
            raise ValueError(f"{self.name or 'image set'}: {n} images but {len(self.ids)} ids, {len(self.groups)} groups")
        if self.masks is not None and self.masks.shape != self.images.shape:
            raise ValueError(f"{self.name}: masks {self.masks.shape} do not match images {self.images.shape}")
        if not self.conditions:
            self.conditions = [{} for _ in range(n)]
        if not self.prompts:
            self.prompts = ["" for _ in range(n)]

    def __len__(self) -> int:
        return len(self.images)

    @property
    def spatial_dims(self) -> int:
        return self.images.ndim - 1

    def physical(self) -> np.ndarray:
        return self.intensity.inverse(self.images)

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageSet:
        index = np.asarray(indices, dtype=int)
        return ImageSet(self.images[index], [self.ids[i] for i in index], [self.groups[i] for i in index],
                        self.spacing, self.intensity, self.is_synthetic,
                        None if self.masks is None else self.masks[index],
                        [self.conditions[i] for i in index], [self.prompts[i] for i in index], self.name,
                        [self.sources[i] for i in index] if self.sources else [])

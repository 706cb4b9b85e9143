"""The sets a scorecard compares: synthetic samples, the training images, unseen real images.

Every scorer takes ``ImageSet`` objects (or their arrays). All sets of one scoring run share one intensity
mapping onto [-1, 1] and one grid, so a pixel or feature difference is a difference of content.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from radsynth.pipelines.data.preprocess import IntensityMap

from .features.base import BATCH_SIZE, chunks


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


def image_array(count: int, shape: Sequence[int], dtype, on_disk_in: str | Path | None = None) -> np.ndarray:
    """An empty (count, *shape) array to fill image by image: in memory, or, with ``on_disk_in``, a memory-mapped
    file in that folder, so that a set larger than memory is decoded and scored without holding it there.

    The file is anonymous (unlinked as it is created): it disappears with the array, and a killed run leaves
    nothing behind. Scorers read such a set in batches (``map_batches``); the pages they touch are cache
    the OS may drop, not the process's own memory.
    """
    if on_disk_in is None:
        return np.empty((count, *shape), dtype=dtype)
    handle = tempfile.TemporaryFile(dir=on_disk_in, prefix=".scoring-set-")
    return np.memmap(handle, dtype=dtype, mode="w+", shape=(count, *shape))


def map_batches(function: Callable[[slice], np.ndarray], count: int, batch_size: int = BATCH_SIZE) -> np.ndarray:
    """``function`` of consecutive slices of ``range(count)``, its outputs concatenated along the first axis: how a
    per-image pass walks a set held on disk (for functions whose rows do not depend on the rest of the batch)."""
    # An empty set is one empty slice: the function still gives its output's shape.
    return np.concatenate([function(part) for part in chunks(max(count, 1), batch_size)])


class ConcatenatedRows:
    """Arrays stacked along the first axis without copying them: indexing with row numbers (or a slice) gathers
    those rows from each part. What a training loop drawing random batches from real plus synthetic images needs,
    so that a synthetic set held on disk is never copied whole into memory."""

    def __init__(self, *parts: np.ndarray) -> None:
        if len({tuple(part.shape[1:]) for part in parts}) != 1:
            raise ValueError(f"parts of different shapes: {[tuple(part.shape) for part in parts]}")
        self.parts = parts
        self.starts = np.cumsum([0, *(len(part) for part in parts)])
        self.shape = (int(self.starts[-1]), *parts[0].shape[1:])
        self.dtype = parts[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: np.ndarray | slice) -> np.ndarray:
        rows = np.arange(len(self))[rows] if isinstance(rows, slice) else np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1 or (len(rows) and not 0 <= rows.min() <= rows.max() < len(self)):
            raise IndexError(f"rows must be a 1-D array of row numbers below {len(self)}")
        owner = np.searchsorted(self.starts, rows, side="right") - 1
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        for k, part in enumerate(self.parts):
            mine = owner == k
            if mine.any():
                out[mine] = part[rows[mine] - self.starts[k]]
        return out

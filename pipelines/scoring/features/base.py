"""The contract every scoring feature space keeps, and the input checks they share.

A feature space maps images on the model's [-1, 1] scale to one float64 row per image. Rows must not depend
on the batch size or on which other images share a call: scorers compare sets that were embedded in
different calls (synthetic now, training images from a cache), so anything batch-dependent (BatchNorm in
train mode, per-batch normalisation) would show up as a fake distribution shift.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = ["FeatureExtractor", "check_images", "check_masks", "chunks"]


@runtime_checkable
class FeatureExtractor(Protocol):
    """``extract(images (N, *spatial) in [-1, 1], masks (N, *spatial) int or None) -> float64 (N, F)``."""

    name: str

    def extract(self, images: np.ndarray, masks: np.ndarray | None = None, batch_size: int = 64) -> np.ndarray: ...


BATCH_SIZE = 64  # images per batch in the per-image passes over a set


def check_images(images: np.ndarray, spatial_dims: int, who: str) -> np.ndarray:
    """``images`` as float32 (N, *spatial) with ``spatial_dims`` spatial axes; a clear error otherwise."""
    array = np.asarray(images)
    if array.ndim != spatial_dims + 1:
        raise ValueError(f"{who}: expected images of shape (N, {', '.join('DHW'[-spatial_dims:])}) for "
                         f"spatial_dims={spatial_dims}, got shape {array.shape}")
    # Batch by batch: a set held on disk (``image_sets.image_array``) is not read whole for one check.
    if not all(np.isfinite(array[part]).all() for part in chunks(len(array), BATCH_SIZE)):
        raise ValueError(f"{who}: images contain NaN or infinite values")
    return array.astype(np.float32, copy=False)


def check_masks(masks: np.ndarray | None, images: np.ndarray, who: str) -> np.ndarray | None:
    if masks is None:
        return None
    array = np.asarray(masks)
    if array.shape != images.shape:
        raise ValueError(f"{who}: masks of shape {array.shape} do not match images of shape {images.shape}")
    return array.astype(np.int64, copy=False)


def chunks(n: int, batch_size: int) -> Iterator[slice]:
    """Consecutive slices of ``range(n)`` of at most ``batch_size`` items."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))

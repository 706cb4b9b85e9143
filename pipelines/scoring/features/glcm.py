"""Grey-level co-occurrence (GLCM) texture at distance 1, vectorised over images, regions and directions.

Intensities are quantised to ``bins`` levels over the fixed range [-1, 1] (not each image's own range), so
a brighter image has different co-occurrences, and every set is quantised the same way. For each of the
4 (2D) / 13 (3D) neighbour directions a symmetric co-occurrence matrix is counted with one ``np.bincount``
over all images (and all label regions) at once; features are computed per direction and averaged over
the directions that have at least one pair (pyradiomics' convention). A region's pairs are those whose two
voxels both lie in the region.
"""

from __future__ import annotations

import itertools

import numpy as np

__all__ = ["GLCM_NAMES", "glcm_counts", "glcm_features", "neighbour_offsets", "quantise"]

GLCM_NAMES = ("contrast", "dissimilarity", "homogeneity", "asm", "correlation", "entropy")

# Below this level variance the GLCM is that of a constant region: correlation is defined as 1.
_CONSTANT_VARIANCE = 1e-12


def quantise(values: np.ndarray, bins: int) -> np.ndarray:
    """Level 0..bins-1 of each intensity: ``bins`` equal bins over [-1, 1], values outside go to the ends."""
    levels = np.floor((np.asarray(values, dtype=np.float64) + 1.0) * (bins / 2.0))
    return np.clip(levels, 0, bins - 1).astype(np.intp)


def neighbour_offsets(spatial_dims: int) -> list[tuple[int, ...]]:
    """Distance-1 neighbour directions, one of each opposite pair: 4 in 2D, 13 in 3D."""
    offsets = []
    for offset in itertools.product((-1, 0, 1), repeat=spatial_dims):
        nonzero = [o for o in offset if o != 0]
        if nonzero and nonzero[0] > 0:
            offsets.append(offset)
    return offsets


def _pair_slices(offset: tuple[int, ...]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Slices (batch axis first) selecting each voxel and its neighbour at ``offset``."""
    first, second = [slice(None)], [slice(None)]
    for step in offset:
        first.append(slice(None, -1) if step > 0 else slice(1, None) if step < 0 else slice(None))
        second.append(slice(1, None) if step > 0 else slice(None, -1) if step < 0 else slice(None))
    return tuple(first), tuple(second)


def glcm_counts(levels: np.ndarray, bins: int, regions: np.ndarray | None = None, n_regions: int = 1) -> np.ndarray:
    """Co-occurrence counts (n, n_regions, n_directions, bins, bins), not yet symmetrised.

    levels: int (n, *spatial) from ``quantise``. regions: int (n, *spatial), the region index (0..n_regions-1)
    of each voxel, -1 for none; None means one region covering each whole image.
    """
    n = levels.shape[0]
    spatial_dims = levels.ndim - 1
    offsets = neighbour_offsets(spatial_dims)
    cells = bins * bins
    counts = np.empty((n, n_regions, len(offsets), bins, bins), dtype=np.float64)
    for direction, offset in enumerate(offsets):
        first, second = _pair_slices(offset)
        pair_code = levels[first] * bins + levels[second]
        if regions is None:
            index = pair_code + (np.arange(n) * cells).reshape((n,) + (1,) * spatial_dims)
            flat = np.bincount(index.ravel(), minlength=n * cells)
        else:
            region_first, region_second = regions[first], regions[second]
            keep = (region_first == region_second) & (region_first >= 0)
            row = np.arange(n).reshape((n,) + (1,) * spatial_dims) * n_regions
            index = (row + region_first) * cells + pair_code
            flat = np.bincount(index[keep], minlength=n * n_regions * cells)
        counts[:, :, direction] = flat.reshape(n, n_regions, bins, bins)
    return counts


def glcm_features(counts: np.ndarray) -> np.ndarray:
    """(..., len(GLCM_NAMES)) features from counts (..., n_directions, bins, bins), averaged over directions.

    Directions with no pairs are left out of the average; a region with no pairs at all gives zeros.
    """
    symmetric = counts + np.swapaxes(counts, -1, -2)
    total = symmetric.sum((-1, -2))
    probability = symmetric / np.maximum(total, 1.0)[..., None, None]
    bins = counts.shape[-1]
    level = np.arange(bins, dtype=np.float64)
    difference = level[:, None] - level[None, :]

    def expect(weight: np.ndarray) -> np.ndarray:
        return (probability * weight).sum((-1, -2))

    marginal = probability.sum(-1)
    mean = (marginal * level).sum(-1)
    variance = (marginal * level ** 2).sum(-1) - mean ** 2
    covariance = expect(level[:, None] * level[None, :]) - mean ** 2
    varying = variance > _CONSTANT_VARIANCE
    correlation = np.where(varying, covariance / np.where(varying, variance, 1.0), 1.0)
    entropy = -expect(np.log2(np.where(probability > 0, probability, 1.0)))
    per_direction = np.stack([expect(difference ** 2), expect(np.abs(difference)),
                              expect(1.0 / (1.0 + difference ** 2)), expect(probability), correlation, entropy],
                             axis=-1)

    has_pairs = (total > 0)[..., None]
    n_with_pairs = has_pairs.sum(-2)
    return np.where(has_pairs, per_direction, 0.0).sum(-2) / np.maximum(n_with_pairs, 1)

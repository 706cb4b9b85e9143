"""First-order intensity statistics of whole images or of a region in each image, vectorised over images.

Regions differ in size from image to image, so every statistic is computed from rows of values with a
boolean region per row (sums weighted by the region, percentiles from a sort where outside values go to
+inf); no Python loop over images or pixels. Energy is the *mean* of squared intensities, not the sum, so it
does not grow with the region's size.
"""

from __future__ import annotations

import numpy as np

from .glcm import quantise

__all__ = ["FIRST_ORDER_NAMES", "PERCENTILES", "first_order_features"]

PERCENTILES = (10.0, 25.0, 50.0, 75.0, 90.0)
FIRST_ORDER_NAMES = ("mean", "sd", "skewness", "kurtosis", *(f"p{int(q)}" for q in PERCENTILES), "iqr",
                     "entropy", "energy", "min", "max")

# Below this variance (intensities live on [-1, 1]) a region is constant: skewness and kurtosis are 0.
_CONSTANT_VARIANCE = 1e-20


def first_order_features(values: np.ndarray, region: np.ndarray | None, bins: int,
                         levels: np.ndarray | None = None) -> np.ndarray:
    """(n, len(FIRST_ORDER_NAMES)) float64 statistics of each row of ``values`` (n, P) inside ``region``.

    region: bool (n, P), or None for every value. levels: ``quantise(values, bins)`` if already at hand.
    Moments are population moments (as scipy.stats' defaults; kurtosis is the excess kurtosis); percentiles
    use numpy's linear interpolation; the histogram entropy (bits) uses ``bins`` equal bins over [-1, 1].
    A row with an empty region gives all zeros.
    """
    values = np.asarray(values, dtype=np.float64)
    n_rows, n_values = values.shape
    weight = None if region is None else np.asarray(region, dtype=bool)
    count = np.full(n_rows, n_values) if weight is None else weight.sum(1)
    present = count > 0
    safe_count = np.maximum(count, 1)

    ordered = np.sort(values if weight is None else np.where(weight, values, np.inf), axis=1)
    last = np.maximum(count - 1, 0)
    ordered[~present] = 0.0
    low, high = ordered[:, 0], ordered[np.arange(n_rows), last]
    percentiles = _region_percentiles(ordered, count, PERCENTILES)

    # Moments about the region's minimum: a constant region gives exact zeros, not rounding noise.
    shifted = values - low[:, None]
    if weight is not None:
        shifted *= weight
    mean_shift = shifted.sum(1) / safe_count
    centred = shifted - mean_shift[:, None]
    if weight is not None:
        centred *= weight
    squared = centred * centred
    m2 = squared.sum(1) / safe_count
    m3 = (squared * centred).sum(1) / safe_count
    m4 = (squared * squared).sum(1) / safe_count
    varying = m2 > _CONSTANT_VARIANCE
    safe_m2 = np.where(varying, m2, 1.0)
    skewness = np.where(varying, m3 / safe_m2 ** 1.5, 0.0)
    kurtosis = np.where(varying, m4 / safe_m2 ** 2 - 3.0, 0.0)

    energy_terms = values * values
    if weight is not None:
        energy_terms *= weight
    energy = energy_terms.sum(1) / safe_count

    histogram_index = (quantise(values, bins) if levels is None else levels) + (np.arange(n_rows) * bins)[:, None]
    histogram_index = histogram_index if weight is None else histogram_index[weight]
    histogram = np.bincount(histogram_index.ravel(), minlength=n_rows * bins).reshape(n_rows, bins)
    probability = histogram / safe_count[:, None]
    entropy = -(probability * np.log2(np.where(probability > 0, probability, 1.0))).sum(1)

    features = np.column_stack([mean_shift + low, np.sqrt(m2), skewness, kurtosis, percentiles,
                                percentiles[:, 3] - percentiles[:, 1], entropy, energy, low, high])
    features[~present] = 0.0
    return features


def _region_percentiles(ordered: np.ndarray, count: np.ndarray, quantiles: tuple[float, ...]) -> np.ndarray:
    """numpy's 'linear' percentiles of the first ``count[i]`` sorted values of each row, (n, len(quantiles))."""
    position = np.asarray(quantiles) / 100.0 * np.maximum(count - 1, 0)[:, None]
    below = np.floor(position).astype(np.intp)
    above = np.minimum(below + 1, np.maximum(count - 1, 0)[:, None])
    fraction = position - below
    lower = np.take_along_axis(ordered, below, axis=1)
    upper = np.take_along_axis(ordered, above, axis=1)
    return lower + (upper - lower) * fraction

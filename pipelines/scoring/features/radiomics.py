"""F1: a weight-free radiomics-style feature vector, 2D and 3D, per label region when masks exist.

Nothing is learned, so F1 cannot be fooled by a network's blind spots and means the same on every dataset:
first-order intensity statistics, GLCM texture, LoG band energies and Haar wavelet band energies of the
whole image, then (with ``labels``) first-order + GLCM features inside each label region. A label missing
from an image gives zeros and a 0 presence flag, never NaN, so the vector always has the same length.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .base import check_images, check_masks, chunks
from .filter_bands import haar_band_names, haar_energies, log_energies
from .first_order import FIRST_ORDER_NAMES, first_order_features
from .glcm import GLCM_NAMES, glcm_counts, glcm_features, quantise

__all__ = ["RadiomicsFeatures"]


class RadiomicsFeatures:
    """Radiomics-style features of images on [-1, 1]; see ``feature_names`` for the order.

    spatial_dims: 2 or 3. bins: grey levels for GLCM and the histogram entropy, over [-1, 1].
    log_sigmas: LoG scales in voxels. labels: label values to describe separately (in this order); when
    given, ``extract`` needs masks.
    """

    name = "radiomics"

    def __init__(self, spatial_dims: int, bins: int = 32, log_sigmas: Sequence[float] = (1.0, 2.0, 4.0),
                 labels: Sequence[int] | None = None):
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if bins < 2:
            raise ValueError(f"bins must be >= 2, got {bins}")
        self.spatial_dims = spatial_dims
        self.bins = int(bins)
        self.log_sigmas = tuple(float(s) for s in log_sigmas)
        self.labels = None if labels is None else [int(label) for label in labels]

    @property
    def feature_names(self) -> list[str]:
        region = [f"firstorder_{n}" for n in FIRST_ORDER_NAMES] + [f"glcm_{n}" for n in GLCM_NAMES]
        names = region + [f"log_sigma{s:g}_energy" for s in self.log_sigmas]
        names += [f"wavelet_{band}_energy" for band in haar_band_names(self.spatial_dims)]
        for label in self.labels or []:
            names += [f"label{label}_present"] + [f"label{label}_{n}" for n in region]
        return names

    @property
    def num_features(self) -> int:
        return len(self.feature_names)

    def extract(self, images: np.ndarray, masks: np.ndarray | None = None, batch_size: int = 64) -> np.ndarray:
        """float64 (N, num_features); images are described one at a time, so rows do not depend on the batch."""
        array = check_images(images, self.spatial_dims, "RadiomicsFeatures")
        label_maps = check_masks(masks, array, "RadiomicsFeatures")
        if self.labels and label_maps is None:
            raise ValueError(f"RadiomicsFeatures: labels {self.labels} were requested but no masks were passed")
        rows = [self._features(array[part], None if label_maps is None else label_maps[part])
                for part in chunks(len(array), batch_size)]
        return np.concatenate(rows) if rows else np.zeros((0, self.num_features))

    def _features(self, images: np.ndarray, masks: np.ndarray | None) -> np.ndarray:
        n = len(images)
        values = images.reshape(n, -1)
        levels = quantise(images, self.bins)
        parts = [first_order_features(values, None, self.bins, levels.reshape(n, -1)),
                 glcm_features(glcm_counts(levels, self.bins))[:, 0],
                 log_energies(images, self.log_sigmas),
                 haar_energies(images)]
        if self.labels:
            parts.append(self._label_features(values, levels, masks))
        return np.concatenate(parts, axis=1)

    def _label_features(self, values: np.ndarray, levels: np.ndarray, masks: np.ndarray) -> np.ndarray:
        """Per label, in ``labels`` order: presence, first-order and GLCM features of the region."""
        regions = np.full(masks.shape, -1, dtype=np.intp)
        for index, label in enumerate(self.labels):
            regions[masks == label] = index
        texture = glcm_features(glcm_counts(levels, self.bins, regions, len(self.labels)))
        flat_regions = regions.reshape(len(values), -1)
        flat_levels = levels.reshape(len(values), -1)
        parts = []
        for index in range(len(self.labels)):
            inside = flat_regions == index
            parts += [inside.any(1, keepdims=True).astype(np.float64),
                      first_order_features(values, inside, self.bins, flat_levels), texture[:, index]]
        return np.concatenate(parts, axis=1)

"""Band energies: Laplacian-of-Gaussian responses at several scales and one level of the Haar wavelet.

They capture how much structure an image has at each scale (noise and over-smoothing show up here first).
Both are computed for a whole batch in one call: the filters act on the spatial axes only.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = ["haar_band_names", "haar_energies", "haar_subbands", "log_energies"]


def log_energies(images: np.ndarray, sigmas: Sequence[float]) -> np.ndarray:
    """(n, len(sigmas)) mean squared scale-normalised LoG response, ``sigma**2 * LoG_sigma(image)``.

    The sigma**2 factor makes a blob of radius ~sigma*sqrt(d) respond equally at every scale, so the bands
    are comparable; the border is handled by reflection.
    """
    images = np.asarray(images, dtype=np.float32)
    axes = tuple(range(1, images.ndim))
    # The LoG ignores constants in theory, but the truncated kernel does not sum to exactly 0: removing each
    # image's mean first keeps a flat image at exactly 0 energy and brightness out of the bands.
    images = images - images.mean(axis=axes, keepdims=True)
    columns = []
    for sigma in sigmas:
        # axes= keeps the batch axis out: with sigma 0 there, scipy would still add an (underived) term for it.
        response = ndimage.gaussian_laplace(images, sigma=float(sigma), axes=axes)
        columns.append((float(sigma) ** 2 * response.astype(np.float64)) ** 2)
    return np.column_stack([c.mean(axes) for c in columns]) if columns else np.zeros((len(images), 0))


def haar_band_names(spatial_dims: int) -> list[str]:
    """'L'/'H' per spatial axis in axis order: LL, LH, HL, HH in 2D; LLL ... HHH in 3D."""
    return ["".join(code) for code in itertools.product("LH", repeat=spatial_dims)]


def haar_subbands(images: np.ndarray) -> list[np.ndarray]:
    """One-level orthonormal Haar transform along every spatial axis, bands in ``haar_band_names`` order.

    Odd axes lose their last voxel (the transform pairs neighbours).
    """
    bands = [np.asarray(images, dtype=np.float64)]
    for axis in range(1, bands[0].ndim):
        split = []
        for band in bands:
            even_length = band.shape[axis] - band.shape[axis] % 2
            first = np.take(band, np.arange(0, even_length, 2), axis=axis)
            second = np.take(band, np.arange(1, even_length, 2), axis=axis)
            split += [(first + second) / np.sqrt(2.0), (first - second) / np.sqrt(2.0)]
        bands = split
    return bands


def haar_energies(images: np.ndarray) -> np.ndarray:
    """(n, 2**spatial_dims) sub-band energies, each the band's sum of squares over the (cropped) voxel count.

    The transform is orthonormal, so the bands' energies add up to the image's mean squared intensity.
    """
    bands = haar_subbands(images)
    n_voxels = bands[0][0].size * len(bands)
    return np.column_stack([(band ** 2).reshape(len(band), -1).sum(1) / n_voxels for band in bands])

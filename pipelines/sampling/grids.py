"""Sample grids for people: one PNG of many images, 2D tiles or the middle axial slice of each volume."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data.io import write_png


def save_grid(images: np.ndarray, rows: int, path: str | Path, gap: int = 2) -> Path:
    """Tile (N, 1, *spatial) images in [-1, 1] into ``rows`` rows; a 3D volume shows its middle axial slice.

    Preprocessed arrays are RAS (axis 0 left->right, axis 1 posterior->anterior), so an axial slice is shown
    rotated to the radiological view: anterior up, patient's right on the left of the screen.
    """
    images = np.asarray(images, dtype=np.float32)[:, 0]
    if images.ndim == 4:
        images = np.rot90(images[..., images.shape[-1] // 2], k=1, axes=(1, 2))
    count, height, width = images.shape
    columns = -(-count // rows)
    canvas = np.zeros((rows * (height + gap) - gap, columns * (width + gap) - gap), dtype=np.uint8)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        tile = np.round((np.clip(image, -1, 1) + 1) * 127.5).astype(np.uint8)
        canvas[row * (height + gap):row * (height + gap) + height,
               column * (width + gap):column * (width + gap) + width] = tile
    return write_png(path, canvas)

"""Geometry from file headers alone, so building a manifest never decodes voxel data."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib

from radsynth.configs.errors import UserInputError

from ..io import spacing_of


def nifti_geometry(path: Path) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """(shape, spacing) of a NIfTI file; a trailing singleton axis (x, y, z, 1) is dropped as the reader does."""
    try:
        image = nib.load(str(path))
    except Exception as error:  # nibabel raises several types for a bad header
        raise UserInputError(path, f"unreadable NIfTI header ({type(error).__name__}: {error})") from None
    shape = tuple(int(n) for n in image.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape, spacing_of(image.affine)[: len(shape)]

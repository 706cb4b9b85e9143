"""Pixel data of one DICOM file: decoder availability, decoding, and the modality LUT (rescale to HU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, get_decoder

from radsynth.configs.errors import UserInputError

from .errors import first_line, unreadable


def read_slice_values(path: Path) -> np.ndarray:
    """One slice in physical units (HU for CT) as float32 [row, column], modality LUT (rescale) applied."""
    dataset = _read_full(path)
    _check_decoder(dataset, path)
    try:
        pixels = dataset.pixel_array
    except Exception as error:  # noqa: BLE001 - decoders and the buffer checks raise many types
        raise UserInputError(
            path, f"unreadable or truncated pixel data ({type(error).__name__}: {first_line(error)})"
        ) from None
    if pixels.ndim != 2:
        raise UserInputError(path, f"expected one greyscale image, got pixel array of shape {pixels.shape}")
    # Slope and intercept may differ per slice (common in MR), so each slice is rescaled with its own.
    return np.asarray(apply_modality_lut(pixels, dataset), dtype=np.float32)


def _read_full(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path, force=False)
    except Exception as error:  # noqa: BLE001 - see scan._read_header
        raise unreadable(path, f"{type(error).__name__}: {first_line(error)}") from None


def _check_decoder(dataset: Dataset, path: Path) -> None:
    syntax = dataset.file_meta.TransferSyntaxUID
    if not syntax.is_compressed:
        return
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise UserInputError(path, f"no decoder exists for transfer syntax {syntax.name}") from None
    if not decoder.is_available:
        raise UserInputError(
            path,
            f"pixel data is compressed ({syntax.name}) and no installed package decodes it",
            "install one of: " + "; ".join(decoder.missing_dependencies),
        )



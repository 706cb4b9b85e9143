"""Content checks every case passes before it is preprocessed, whatever adapter it came from.

Each failure is a ``UserInputError`` naming the file: a silently bad case would train the generator on
garbage, or worse, pass a wrong label map into a released dataset.
"""

from __future__ import annotations

import numpy as np

from radsynth.configs.errors import UserInputError

from .io import Image

AFFINE_TOLERANCE_MM = 1e-3


class ConstantImage(UserInputError):
    """An image of one value: nothing to learn (a pretraining corpus' blank slices; ``skip_constant`` drops them)."""


def check_image(image: Image, where: str) -> None:
    array = image.array
    if array.size == 0 or 0 in array.shape:
        raise UserInputError(where, f"empty image (shape {tuple(array.shape)})", "every axis needs at least 1 voxel")
    if np.issubdtype(array.dtype, np.floating):
        bad = ~np.isfinite(array)
        if bad.any():
            raise UserInputError(where, f"{int(bad.sum())} NaN/Inf voxels", "all voxels must be finite")
    if array.min() == array.max():
        raise ConstantImage(where, f"empty image: every voxel is {array.flat[0]}", "an image with some contrast")


def check_label(label: Image, image: Image, label_names: dict[int, str], where: str) -> np.ndarray:
    """Validate a label map against its image and the label vocabulary; return it as integers."""
    values = label.array
    if values.shape != image.array.shape:
        raise UserInputError(
            where,
            f"label shape {tuple(values.shape)} differs from image shape {tuple(image.array.shape)}",
            "image and label must share one voxel grid",
        )
    scale = max(1.0, float(np.abs(image.affine[:-1, :-1]).max()))
    if np.abs(label.affine - image.affine).max() > AFFINE_TOLERANCE_MM * scale:
        raise UserInputError(where, "label affine differs from image affine", "image and label must share one affine")
    if np.issubdtype(values.dtype, np.floating):
        if not np.isfinite(values).all() or not np.array_equal(values, np.round(values)):
            raise UserInputError(where, "label map has non-integer values", "integer labels 0..N")
    present = np.unique(values).astype(np.int64)
    unknown = sorted(set(present.tolist()) - set(label_names))
    if unknown:
        raise UserInputError(
            where,
            f"label values {unknown} are not in the label map",
            f"allowed: {sorted(label_names)} ({', '.join(label_names.values())})",
        )
    return values.astype(label_dtype(label_names), copy=False)


def label_dtype(label_names: dict[int, str]) -> np.dtype:
    return np.dtype(np.uint8) if max(label_names) < 256 else np.dtype(np.int16)


def pooled_label_values(values: np.ndarray, mapping: dict[int, int], where: str) -> np.ndarray:
    """A source's label map in the pool's vocabulary (``CaseRecord.label_values``): each value looked up, a value the
    source's own vocabulary lacks refused as ``check_label`` would."""
    present = np.unique(values)
    if np.issubdtype(present.dtype, np.floating) and not np.array_equal(present, np.round(present)):
        raise UserInputError(where, "label map has non-integer values", "integer labels 0..N")
    unknown = sorted(set(present.astype(np.int64).tolist()) - set(mapping))
    if unknown:
        raise UserInputError(where, f"label values {unknown} are not in the source's label map",
                             f"allowed: {sorted(mapping)}")
    table = np.zeros(max(mapping) + 1, dtype=np.int64)
    for source_value, pooled_value in mapping.items():
        table[source_value] = pooled_value
    return table[values.astype(np.int64)]

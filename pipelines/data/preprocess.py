"""Explicit, invertible preprocessing: RAS orientation, resampling, crop/pad and intensity normalisation.

Every geometric step updates the voxel-to-world affine, so a preprocessed array still knows where it sits
in the patient, and ``restore_geometry`` can put any array on that grid back onto the original one. The
intensity map sends a physical range (a CT window in HU, MRI / X-ray percentiles) to [-1, 1]; its inverse
brings generated images back to physical units. One code path serves 2D and 3D.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from radsynth.configs.schema import IntensityConfig, Modality, PreprocessConfig

from .io import Image, spacing_of

# ----------------------------------------------------------------------------------------- intensity


@dataclass(frozen=True)
class IntensityMap:
    """Linear map of [low, high] (physical units) onto [-1, 1], clipping outside."""

    mode: str
    low: float
    high: float

    def forward(self, array: np.ndarray) -> np.ndarray:
        if self.mode == "none":
            return array.astype(np.float32)
        scaled = (array.astype(np.float32) - self.low) / (self.high - self.low) * 2.0 - 1.0
        return np.clip(scaled, -1.0, 1.0)

    def inverse(self, array: np.ndarray) -> np.ndarray:
        if self.mode == "none":
            return np.asarray(array, dtype=np.float32)
        return ((np.asarray(array, dtype=np.float32) + 1.0) / 2.0 * (self.high - self.low) + self.low).astype(
            np.float32
        )


def fit_intensity_map(array: np.ndarray, modality: Modality, config: IntensityConfig) -> IntensityMap:
    mode = config.mode
    if mode == "auto":
        mode = "ct_window" if modality == "ct" else "percentile"
    if mode == "none":
        return IntensityMap("none", 0.0, 1.0)
    if mode == "ct_window":
        return IntensityMap(mode, *config.ct_window)
    # MRI background is zero and carries no information about tissue contrast; X-ray borders do.
    values = array[array > 0] if modality == "mri" and (array > 0).any() else array
    low, high = np.percentile(values, config.percentiles)
    if high <= low:
        low, high = float(values.min()), float(values.max())
    return IntensityMap(mode, float(low), float(high))


# ------------------------------------------------------------------------------------------ geometry


def to_ras(image: Image) -> Image:
    """Reorder and flip 3D axes so the array is closest to RAS+; 2D rasters (row, column) stay as read."""
    if image.spatial_dims != 3:
        return image
    current = nib.orientations.io_orientation(image.affine)
    transform = nib.orientations.ornt_transform(current, nib.orientations.axcodes2ornt("RAS"))
    if np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):
        return image
    array = nib.orientations.apply_orientation(image.array, transform)
    inverse = nib.orientations.inv_ornt_aff(transform, image.array.shape)
    return Image(np.ascontiguousarray(array), image.affine @ inverse)


def resample(image: Image, scale: np.ndarray, shape: tuple[int, ...] | None, order: int) -> Image:
    """Resample onto a grid whose voxel is ``scale`` old voxels wide.

    With ``shape`` the grid has that shape and ``scale`` must be old shape / new shape (resize); without it
    the spacing is exact and the shape is floor(old / scale) (spacing mode). Centres follow
    ``align_corners=False``: new voxel j sits at old coordinate (j + 0.5) * scale - 0.5. Images are
    Gaussian-prefiltered along axes that shrink (anti-aliasing); labels use nearest neighbour.
    """
    scale = np.asarray(scale, dtype=np.float64)
    grid = {"size": tuple(shape)} if shape is not None else {
        "scale_factor": tuple(float(f) for f in 1.0 / scale), "recompute_scale_factor": False}
    array = image.array
    if order == 0:
        tensor = torch.from_numpy(np.ascontiguousarray(array).astype(np.int32, copy=False))[None, None].float()
        out = F.interpolate(tensor, mode="nearest-exact", **grid)[0, 0].numpy().astype(array.dtype)
    else:
        array = array.astype(np.float32, copy=False)
        sigma = np.where(scale > 1, np.sqrt(np.maximum(scale**2 - 1, 0)) / 2, 0)
        if sigma.any():
            array = ndimage.gaussian_filter(array, sigma=sigma, mode="nearest")
        mode = "bilinear" if array.ndim == 2 else "trilinear"
        tensor = torch.from_numpy(np.ascontiguousarray(array))[None, None]
        out = F.interpolate(tensor, mode=mode, align_corners=False, **grid)[0, 0].numpy()
    step = np.eye(len(scale) + 1)
    step[:-1, :-1] = np.diag(scale)
    step[:-1, -1] = (scale - 1) / 2
    return Image(out, image.affine @ step)


def crop_or_pad(image: Image, shape: tuple[int, ...], fill: float) -> Image:
    """Centre crop and/or pad each axis to ``shape``; the affine origin moves with the crop."""
    source = image.array
    out = np.full(shape, fill, dtype=source.dtype)
    offset = [(old - new) // 2 for old, new in zip(source.shape, shape)]
    sizes = [min(old, new) for old, new in zip(source.shape, shape)]
    source_slices = tuple(slice(max(o, 0), max(o, 0) + n) for o, n in zip(offset, sizes))
    target_slices = tuple(slice(max(-o, 0), max(-o, 0) + n) for o, n in zip(offset, sizes))
    out[target_slices] = source[source_slices]
    shift = np.eye(len(shape) + 1)
    shift[:-1, -1] = offset
    return Image(out, image.affine @ shift)


def target_grid(image: Image, config: PreprocessConfig) -> tuple[np.ndarray, tuple[int, ...] | None]:
    """(scale, shape) for ``resample``: the target shape when resizing, None when the spacing decides it."""
    if config.target_spacing is None:
        return np.array(image.array.shape) / np.array(config.target_shape), tuple(config.target_shape)
    return np.array(config.target_spacing) / np.array(spacing_of(image.affine)), None


# ------------------------------------------------------------------------------------------ one case


@dataclass
class PreprocessedCase:
    image: np.ndarray  # float32, [-1, 1], shape (1, *target_shape)
    label: np.ndarray | None  # integer, shape (1, *target_shape)
    affine: np.ndarray  # voxel -> world of the preprocessed grid
    intensity: IntensityMap
    original_shape: tuple[int, ...]
    original_affine: np.ndarray
    # Label values in the source that did not survive resampling (a 1-pixel nodule at half resolution):
    # the case's text may still name that finding, so the summary reports them.
    lost_labels: tuple[int, ...] = ()


def preprocess_case(
    image: Image, label: Image | None, modality: Modality, config: PreprocessConfig
) -> PreprocessedCase:
    if image.spatial_dims != len(config.target_shape):
        raise ValueError(f"image is {image.spatial_dims}D but target_shape has {len(config.target_shape)} entries")
    original_shape, original_affine = image.array.shape, image.affine
    source_labels = set(np.unique(label.array).tolist()) if label is not None else set()
    image = to_ras(image)
    label = to_ras(label) if label is not None else None
    intensity = fit_intensity_map(image.array, modality, config.intensity)

    scale, shape = target_grid(image, config)
    if not np.allclose(scale, 1.0):
        image = resample(image, scale, shape, order=1)
        label = resample(label, scale, shape, order=0) if label is not None else None
    target = tuple(config.target_shape)
    background = float(intensity.low) if intensity.mode != "none" else float(image.array.min())
    image = crop_or_pad(image, target, fill=background)
    label = crop_or_pad(label, target, fill=0) if label is not None else None

    kept_labels = set(np.unique(label.array).tolist()) if label is not None else set()
    return PreprocessedCase(
        image=intensity.forward(image.array)[None],
        label=label.array[None] if label is not None else None,
        affine=image.affine,
        intensity=intensity,
        original_shape=tuple(original_shape),
        original_affine=original_affine,
        lost_labels=tuple(sorted(source_labels - kept_labels)),
    )


def restore_geometry(
    array: np.ndarray, affine: np.ndarray, original_affine: np.ndarray, original_shape: tuple[int, ...], order: int
) -> np.ndarray:
    """Resample an array on a preprocessed grid back onto the original voxel grid (the geometric inverse)."""
    # For each original voxel: world position, then the fractional index on the preprocessed grid.
    mapping = np.linalg.inv(affine) @ original_affine
    fill = 0.0 if order == 0 else float(np.min(array))
    return ndimage.affine_transform(
        array, mapping[:-1, :-1], offset=mapping[:-1, -1], output_shape=tuple(original_shape),
        order=order, mode="constant", cval=fill,
    )

"""Writing one sample's image and label map into a release layout: NIfTI or 16-bit PNG, the same grid for both.

Every format goes through ``write_pair``, so the rules live in one place: NIfTI images keep physical units
(HU for CT) as float32 and say "radsynth synthetic" in ``descrip`` when they are; labels are the smallest
unsigned integer type on the image's exact affine; 16-bit PNGs keep the sample's own mapping to physical units.
A 2D sample is the same pair either way: NIfTI holds it as one slice, as the sample writer does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from radsynth.pipelines.data.io import Image, is_nifti, read_image, spacing_of, write_nifti, write_png
from radsynth.pipelines.release.samples import DatasetInfo, ReleaseSample
from radsynth.pipelines.sampling.writers import SYNTHETIC_DESCRIPTION, physical_to_png16

NIFTI_ENDING = ".nii.gz"
PNG_ENDING = ".png"


@dataclass(frozen=True)
class WrittenPair:
    image: Path
    label: Path | None = None
    png_range: tuple[float, float] | None = None  # physical (low, high) behind 0..65535 of a PNG image
    png_spacing: tuple[float, ...] | None = None  # (between rows, between columns) in mm: a PNG cannot hold it

    @property
    def paths(self) -> list[Path]:
        return [self.image] if self.label is None else [self.image, self.label]


def image_ending(info: DatasetInfo) -> str:
    """PNG for 2D X-ray (its native 16-bit form, read by nnU-Net and MONAI), NIfTI otherwise (keeps HU)."""
    return PNG_ENDING if info.spatial_dims == 2 and info.modality == "xray" else NIFTI_ENDING


def write_pair(sample: ReleaseSample, image_path: Path, label_path: Path | None = None) -> WrittenPair:
    """The sample's image at ``image_path`` and, when ``label_path`` is given, its label map, in the format
    that the image path's ending names."""
    image = sample.read_image()
    label = None
    if label_path is not None:
        label = sample.read_label()
        if label is None:
            raise ValueError(f"sample {sample.sample_id} has no label map to write to {label_path}")
        if label.array.shape != image.array.shape:
            raise ValueError(f"sample {sample.sample_id}: label shape {label.array.shape} differs from {image.array.shape}")
    if is_nifti(image_path):
        description = SYNTHETIC_DESCRIPTION if sample.is_synthetic else ""
        write_nifti(image_path, *as_nifti_volume(image.array.astype(np.float32), image.affine), description=description)
        if label is not None:
            write_nifti(label_path, *as_nifti_volume(smallest_label_type(label.array), image.affine), description=description)
        return WrittenPair(image_path, label_path)
    pixels, png_range = png16_pixels(sample, image)
    write_png(image_path, pixels)
    if label is not None:
        write_png(label_path, smallest_label_type(planar(label).array))
    return WrittenPair(image_path, label_path, png_range, spacing_of(planar(image).affine))


def as_nifti_volume(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NIfTI is 3D: a 2D (row, column) image becomes one slice with its in-plane affine and 1 mm depth."""
    if array.ndim == 3:
        return array, affine
    volume_affine = np.eye(4)
    volume_affine[:2, :2], volume_affine[:2, 3] = affine[:2, :2], affine[:2, 2]
    return array[..., None], volume_affine


def planar(image: Image) -> Image:
    """A 2D image as (row, column) with a 3x3 affine, also when it was stored as a one-slice NIfTI."""
    if image.array.ndim == 2:
        return image
    if image.array.ndim == 3 and image.array.shape[-1] == 1:
        affine = np.eye(3)
        affine[:2, :2], affine[:2, 2] = image.affine[:2, :2], image.affine[:2, 3]
        return Image(image.array[..., 0], affine)
    raise ValueError(f"expected a 2D image, got shape {image.array.shape}")


def png16_pixels(sample: ReleaseSample, image: Image | None = None) -> tuple[np.ndarray, tuple[float, float]]:
    """The sample as 16-bit pixels and the physical (low, high) they span.

    A PNG sample keeps its own pixels and mapping bit for bit; any other sample is mapped over its own range.
    """
    if sample.image_path.suffix == PNG_ENDING:
        pixels = np.asarray(read_image(sample.image_path).array, dtype=np.uint16)
        return pixels, (float(sample.sidecar["png_low"]), float(sample.sidecar["png_high"]))
    array = planar(image or sample.read_image()).array
    low, high = float(array.min()), float(array.max())
    high = high if high > low else low + 1.0  # a constant image: any non-empty range maps it exactly
    return physical_to_png16(array, low, high), (low, high)


def smallest_label_type(label: np.ndarray) -> np.ndarray:
    """uint8 up to 255 labels, uint16 above: what PNG and every segmentation tool read as integers."""
    return label.astype(np.uint8 if label.max(initial=0) <= np.iinfo(np.uint8).max else np.uint16)

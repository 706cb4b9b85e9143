"""Write one generated sample to disk: the image (NIfTI with its affine, or 16-bit PNG) and a JSON sidecar.

The sidecar is the sample's provenance (prompt, seed, scheduler, steps, guidance, model hash) and always says
``"is_synthetic": true``; NIfTI headers say so too (``descrip`` "radsynth synthetic"). A sample is written
completely or not at all: each file goes through a temporary name and a rename, and if the sidecar cannot be
written the image already written is removed again, so a crashed shard can simply be redone.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np

from radsynth.configs.errors import UserInputError
from radsynth.pipelines.data.io import scaling_affine, spacing_of, write_nifti, write_png, write_text

from .sidecar import Sidecar

SYNTHETIC_DESCRIPTION = "radsynth synthetic"
PNG_MAX = 65535
# Documented in every PNG sidecar, so a reader needs nothing else to get physical units back.
PNG_MAPPING = "physical = png_low + value / 65535 * (png_high - png_low)"
REQUIRED_SIDECAR_FIELDS = ("prompt", "seed", "scheduler", "num_inference_steps", "guidance_scale", "model_hash")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class SamplePaths(NamedTuple):
    image: Path
    sidecar: Path
    label: Path | None = None


def write_sample(
    out_dir: str | Path,
    sample_id: str,
    image_physical: np.ndarray,
    affine_or_spacing: np.ndarray | Sequence[float],
    fmt: Literal["nifti", "png16"],
    sidecar: Mapping[str, object],
    png_range: tuple[float, float] | None = None,
    label: np.ndarray | None = None,
) -> SamplePaths:
    """Write ``<sample_id>.nii.gz`` or ``<sample_id>.png`` plus ``<sample_id>.json`` into ``out_dir``.

    image_physical: the spatial array (H, W) or (D, H, W) in physical units (the pipeline's "physical" output).
    affine_or_spacing: a (D+1)x(D+1) voxel-to-world affine, or one spacing per axis in mm.
    sidecar: provenance; must hold REQUIRED_SIDECAR_FIELDS, any other JSON-serialisable fields are kept.
        The writer adds is_synthetic, format, file, shape and spacing (its values win over given ones).
    png_range: the physical (low, high) that png16 maps onto 0..65535 (values outside are clipped); use the
        model's intensity range so that all samples share one mapping. None: the sample's own min..max.
    label: an integer label map (0 = background) on the image's grid, written as ``<sample_id>_label`` in the
        image's format with the same affine (PNG: 8-bit, or 16-bit above 255 labels); the sidecar names it.
    """
    if not _SAFE_ID.match(sample_id):
        raise ValueError(f"sample_id must be a plain file name (letters, digits, . _ -), got {sample_id!r}")
    missing = [field for field in REQUIRED_SIDECAR_FIELDS if field not in sidecar]
    if missing:
        raise ValueError(f"sidecar is missing provenance fields: {', '.join(missing)}")
    image = np.asarray(image_physical)
    if image.ndim not in (2, 3):
        raise ValueError(f"image_physical must be spatial (H, W) or (D, H, W), got shape {image.shape}")
    if not np.isfinite(image).all():
        raise ValueError("image_physical has NaN or infinite values")
    affine = _affine(affine_or_spacing, image.ndim)
    label = None if label is None else _check_label(label, image.shape)
    out_dir = Path(out_dir)

    record = {**sidecar, "is_synthetic": True, "format": fmt, "shape": list(image.shape),
              "spacing": list(spacing_of(affine))}
    if fmt == "nifti":
        image_path = out_dir / f"{sample_id}.nii.gz"
        record["file"] = image_path.name
        write = lambda: _write_nifti(image_path, image, affine)  # noqa: E731
    elif fmt == "png16":
        if image.ndim != 2:
            raise UserInputError(
                "sampling.output_format", f"png16 holds 2D images, got a {image.ndim}D sample", "nifti for 3D"
            )
        low, high = _png_range(image, png_range)
        image_path = out_dir / f"{sample_id}.png"
        record.update(file=image_path.name, png_low=low, png_high=high, png_mapping=PNG_MAPPING)
        write = lambda: write_png(image_path, physical_to_png16(image, low, high))  # noqa: E731
    else:
        raise UserInputError("sampling.output_format", f"unknown format '{fmt}'", "allowed: nifti, png16")
    label_path = None
    if label is not None:
        label_path = image_path.with_name(f"{sample_id}_label{''.join(image_path.suffixes)}")
        record["label_file"] = label_path.name

    # Serialise and check the contract first: a bad sidecar fails before anything touches the disk.
    text = json.dumps(record, indent=2, sort_keys=True, allow_nan=False, default=_json_default)
    Sidecar.model_validate_json(text)
    sidecar_path = out_dir / f"{sample_id}.json"
    try:
        write()
        if label_path is not None:
            _write_label(label_path, label, affine)
        write_text(sidecar_path, text + "\n")
    except BaseException:
        for path in (image_path, label_path):  # an image without its provenance must not stay behind
            if path is not None:
                path.unlink(missing_ok=True)
        raise
    return SamplePaths(image_path, sidecar_path, label_path)


def _check_label(label: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    label = np.asarray(label)
    if label.shape != shape:
        raise ValueError(f"label shape {label.shape} differs from the image's {shape}")
    if not np.issubdtype(label.dtype, np.integer) or (label.size and label.min() < 0):
        raise ValueError(f"label must hold non-negative integers, got {label.dtype} from {label.min()}")
    return label


def _write_label(path: Path, label: np.ndarray, affine: np.ndarray) -> Path:
    if path.name.endswith(".png"):
        return write_png(path, label.astype(np.uint8 if label.max(initial=0) <= 255 else np.uint16))
    dtype = np.uint8 if label.max(initial=0) <= 255 else np.int16
    return _write_nifti(path, label.astype(dtype), affine)


def physical_to_png16(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """Linear map of physical [low, high] onto uint16 0..65535 (clipping outside); inverse in PNG_MAPPING."""
    scaled = (np.asarray(image, dtype=np.float64) - low) / (high - low) * PNG_MAX
    return np.clip(np.rint(scaled), 0, PNG_MAX).astype(np.uint16)


def png16_to_physical(pixels: np.ndarray, low: float, high: float) -> np.ndarray:
    return (low + np.asarray(pixels, dtype=np.float64) / PNG_MAX * (high - low)).astype(np.float32)


def _png_range(image: np.ndarray, png_range: tuple[float, float] | None) -> tuple[float, float]:
    low, high = (float(image.min()), float(image.max())) if png_range is None else map(float, png_range)
    if png_range is None and high <= low:
        high = low + 1.0  # a constant image: any non-empty range maps it exactly
    if not (np.isfinite([low, high]).all() and high > low):
        raise ValueError(f"png_range must be finite with low < high, got {(low, high)}")
    return low, high


def _affine(affine_or_spacing: np.ndarray | Sequence[float], spatial_dims: int) -> np.ndarray:
    values = np.asarray(affine_or_spacing, dtype=np.float64)
    if values.shape == (spatial_dims,):
        if not (values > 0).all():
            raise ValueError(f"spacing must be positive, got {values.tolist()}")
        return scaling_affine(values.tolist())
    if values.shape == (spatial_dims + 1, spatial_dims + 1):
        return values
    raise ValueError(
        f"expected {spatial_dims} spacings or a {spatial_dims + 1}x{spatial_dims + 1} affine, got shape {values.shape}"
    )


def _write_nifti(path: Path, image: np.ndarray, affine: np.ndarray) -> Path:
    if image.ndim == 2:
        # NIfTI is 3D: a 2D sample becomes one slice, its in-plane affine embedded in a 4x4 with 1 mm depth.
        volume_affine = np.eye(4)
        volume_affine[:2, :2], volume_affine[:2, 3] = affine[:2, :2], affine[:2, 2]
        image, affine = image[..., None], volume_affine
    dtype = image.dtype if np.issubdtype(image.dtype, np.integer) else np.float32
    return write_nifti(path, image.astype(dtype), affine, description=SYNTHETIC_DESCRIPTION)


def _json_default(value: object) -> object:
    # numpy scalars and arrays (seeds, spacings) are common in provenance; anything else is a caller bug.
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"sidecar value of type {type(value).__name__} is not JSON-serialisable")

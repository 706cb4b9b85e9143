"""Image files in and out: NIfTI (nibabel), PNG 8/16-bit and JPEG (Pillow).

An ``Image`` is a spatial array plus a (D+1)x(D+1) voxel-to-world affine, so 2D and 3D code share one path.
For 2D files the affine maps (row, column) to millimetres from the pixel spacing. Writers go through a
temporary name and ``os.replace`` so a crash never leaves a half-written file behind.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image as PILImage

from radsynth.configs.errors import UserInputError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class Image:
    array: np.ndarray
    affine: np.ndarray

    @property
    def spatial_dims(self) -> int:
        return self.array.ndim

    @property
    def spacing(self) -> tuple[float, ...]:
        return spacing_of(self.affine)


def spacing_of(affine: np.ndarray) -> tuple[float, ...]:
    return tuple(float(s) for s in np.linalg.norm(affine[:-1, :-1], axis=0))


def scaling_affine(spacing: tuple[float, ...] | list[float]) -> np.ndarray:
    return np.diag([*map(float, spacing), 1.0])


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def strip_image_suffix(name: str) -> str:
    for suffix in (*NIFTI_SUFFIXES, *RASTER_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def read_image(path: str | Path, pixel_spacing: tuple[float, ...] = (1.0, 1.0)) -> Image:
    """Read a NIfTI volume or a 2D raster; any failure to decode is the user's file, named in one line."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(path, "file not found")
    try:
        if is_nifti(path):
            return _read_nifti(path)
        if path.suffix.lower() in RASTER_SUFFIXES:
            return _read_raster(path, pixel_spacing)
    except UserInputError:
        raise
    except PILImage.DecompressionBombError as error:
        raise UserInputError(path, f"image too large to decode ({error})",
                             f"images up to {PILImage.MAX_IMAGE_PIXELS} pixels") from None
    except (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError) as error:
        raise UserInputError(path, f"unreadable or truncated image ({type(error).__name__}: {error})") from None
    raise UserInputError(path, f"unsupported file type '{path.suffix}'", "allowed: .nii, .nii.gz, .png, .jpg, .jpeg")


def _read_nifti(path: Path) -> Image:
    image = nib.load(str(path))
    array = np.asanyarray(image.dataobj)
    # A trailing singleton axis (x, y, z, 1) is common in exported volumes; a real 4th axis is not a volume.
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:  # a slice (nnU-Net's 2D datasets, radsynth's own 2D CT / MRI releases): its in-plane geometry
        affine = np.eye(3)
        affine[:2, :2], affine[:2, 2] = image.affine[:2, :2], image.affine[:2, 3]
        return Image(array, affine)
    if array.ndim != 3:
        raise UserInputError(path, f"expected a 2D slice or a 3D volume, got {array.ndim}D with shape "
                             f"{tuple(array.shape)}", "one channel, 2 or 3 axes")
    return Image(array, image.affine.astype(np.float64))


def _read_raster(path: Path, pixel_spacing: tuple[float, ...]) -> Image:
    with PILImage.open(path) as handle:
        handle.load()
        if handle.mode in ("RGB", "RGBA", "P", "LA"):
            handle = handle.convert("L")
        array = np.asarray(handle)
    if array.ndim != 2:
        raise UserInputError(path, f"expected a 2D grey image, got shape {tuple(array.shape)}")
    return Image(array, scaling_affine(pixel_spacing))


def write_nifti(path: str | Path, array: np.ndarray, affine: np.ndarray, description: str = "") -> Path:
    path = Path(path)
    image = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    image.header.set_xyzt_units("mm")
    if description:
        image.header["descrip"] = description[:79].encode()
    return _atomic(path, lambda temporary: nib.save(image, str(temporary)))


def write_png(path: str | Path, array: np.ndarray) -> Path:
    """Write uint8 or uint16 arrays losslessly (16-bit greyscale for images, 8-bit for label maps)."""
    array = np.asarray(array)
    if array.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"PNG needs uint8 or uint16, got {array.dtype}")
    image = PILImage.fromarray(array)
    return _atomic(Path(path), lambda temporary: image.save(temporary, format="PNG"))


def write_text(path: str | Path, text: str) -> Path:
    return _atomic(Path(path), lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))


def write_json(path: str | Path, payload: object) -> Path:
    return write_text(path, json.dumps(payload, indent=2, default=str) + "\n")


def remove_temporaries(folder: str | Path, stems: Collection[str] | None = None) -> list[Path]:
    """Delete what killed atomic writes left in ``folder``: ``_atomic``'s temporaries (``.<stem>.<pid>.tmp.*``),
    of every file, or only of files named ``<stem>.*`` for ``stems`` (a writer that shares the folder cleans its
    own). Returns what was removed."""
    folder = Path(folder)
    found = sorted(folder.glob(".*.tmp*")) if folder.is_dir() else []
    removed = [path for path in found if stems is None or path.name[1:].split(".tmp")[0].rsplit(".", 1)[0] in stems]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def _atomic(path: Path, write) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    temporary = path.with_name(f".{path.name[: -len(suffix) or None]}.{os.getpid()}.tmp{suffix}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path

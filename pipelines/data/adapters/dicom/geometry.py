"""Geometry of a CT/MR series: the sorted slice stack and its voxel -> world affine (LPS -> RAS), the checks
that make it one regular grid (size, orientation, pixel and slice spacing), the stacked volume and its
reorientation to canonical RAS."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset

from radsynth.configs.errors import UserInputError

from .case import DicomCase
from .pixels import read_slice_values

# Slices may deviate from a perfectly regular grid by this much before the series counts as unevenly spaced.
# Positions are often written with 2-3 decimals, so a purely relative bound would reject rounding noise on
# thin slices; a missing slice moves its neighbours by half a spacing and is far outside either bound.
SPACING_RELATIVE_TOLERANCE = 0.01
SPACING_ABSOLUTE_TOLERANCE_MM = 0.02
ORIENTATION_TOLERANCE = 1e-3  # direction cosines are unit vectors: 1e-3 is ~0.06 degrees


@dataclass
class SliceStack:
    """A CT/MR series in slice order with its voxel -> world (RAS) affine for the array layout below.

    The volume array is indexed ``[column, row, slice]``: nibabel's convention that array axis ``i`` maps
    through affine column ``i``, with the fastest-varying DICOM pixel axis (the column index) first, as
    dcm2niix and ITK do.
    """

    paths: list[Path]
    headers: list[Dataset]
    affine_ras: np.ndarray
    rows: int
    columns: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.columns, self.rows, len(self.paths))


def build_slice_stack(case: DicomCase) -> SliceStack:
    headers, where = case.headers, case.where
    if len(headers) < 2:
        raise UserInputError(
            where, f"a {case.modality} series with {len(headers)} slice", "2 or more slices per series"
        )
    rows, columns = _common_size(case)
    row_cosine, column_cosine = _common_orientation(case)
    pixel_spacing = _common_pixel_spacing(case)
    normal = np.cross(row_cosine, column_cosine)

    positions = np.array([_float_vector(h, "ImagePositionPatient", 3, p) for p, h in zip(case.paths, headers)])
    order = np.argsort(positions @ normal, kind="stable")
    positions = positions[order]
    step = _regular_slice_step(positions, normal, where)

    # DICOM's pixel array is [row, column]. The first three ImageOrientationPatient values (the "row
    # cosine") are the direction along a row, i.e. of increasing COLUMN index; the last three (the "column
    # cosine") are the direction of increasing ROW index. PixelSpacing is [between rows, between columns].
    # So the affine column of array axis "column" is row_cosine * PixelSpacing[1], of axis "row"
    # column_cosine * PixelSpacing[0]. Swapping these transposes every image and mirrors oblique ones.
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_cosine * pixel_spacing[1]
    affine_lps[:3, 1] = column_cosine * pixel_spacing[0]
    # The measured step between slices, not SliceThickness (which may overlap or leave gaps) and not
    # normal * spacing: with gantry tilt the stack is sheared and only the measured step places it right.
    affine_lps[:3, 2] = step
    affine_lps[:3, 3] = positions[0]
    return SliceStack(
        paths=[case.paths[i] for i in order],
        headers=[headers[i] for i in order],
        affine_ras=lps_to_ras(affine_lps),
        rows=rows,
        columns=columns,
    )


def lps_to_ras(affine_lps: np.ndarray) -> np.ndarray:
    """DICOM patient coordinates are LPS (x to the patient's left, y posterior); NIfTI's are RAS."""
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps


def _common_size(case: DicomCase) -> tuple[int, int]:
    sizes = {(int(h.Rows), int(h.Columns)) for h in case.headers}
    if len(sizes) > 1:
        shown = ", ".join(f"{r}x{c}" for r, c in sorted(sizes))
        raise UserInputError(
            case.where, f"slices of different sizes (Rows x Columns: {shown})", "one image size per series"
        )
    return sizes.pop()


def _common_orientation(case: DicomCase) -> tuple[np.ndarray, np.ndarray]:
    orientations = np.array(
        [_float_vector(h, "ImageOrientationPatient", 6, p) for p, h in zip(case.paths, case.headers)]
    )
    if np.abs(orientations - orientations[0]).max() > ORIENTATION_TOLERANCE:
        # Series like this are skipped when grouping (multi-plane scouts); kept for direct callers.
        raise UserInputError(
            case.where,
            "slices in different orientations (ImageOrientationPatient differs; a multi-plane localizer?)",
            "one orientation per series; move other series out of data.root",
        )
    row_cosine, column_cosine = orientations[0, :3], orientations[0, 3:]
    # Normalise: writers round cosines, and the affine's spacing is read back from column norms.
    return row_cosine / np.linalg.norm(row_cosine), column_cosine / np.linalg.norm(column_cosine)


def _common_pixel_spacing(case: DicomCase) -> np.ndarray:
    spacings = np.array([_float_vector(h, "PixelSpacing", 2, p) for p, h in zip(case.paths, case.headers)])
    if not np.allclose(spacings, spacings[0], rtol=1e-4, atol=1e-6):
        raise UserInputError(case.where, "slices with different PixelSpacing", "one pixel spacing per series")
    if np.any(spacings[0] <= 0):
        raise UserInputError(case.paths[0], f"PixelSpacing must be positive, got {spacings[0].tolist()}")
    return spacings[0]


def _regular_slice_step(positions: np.ndarray, normal: np.ndarray, where: str) -> np.ndarray:
    """The step vector between consecutive slices; every slice must lie where a regular grid puts it."""
    gaps = np.diff(positions @ normal)
    if np.any(gaps < SPACING_ABSOLUTE_TOLERANCE_MM):
        raise UserInputError(
            where,
            "several slices at the same position (a multi-echo, multi-phase or diffusion series?)",
            "one slice per position; split 4D series into one series per volume",
        )
    step = (positions[-1] - positions[0]) / (len(positions) - 1)
    expected = positions[0] + np.arange(len(positions))[:, None] * step
    deviation = float(np.linalg.norm(positions - expected, axis=1).max())
    tolerance = max(SPACING_RELATIVE_TOLERANCE * float(np.linalg.norm(step)), SPACING_ABSOLUTE_TOLERANCE_MM)
    if deviation > tolerance:
        raise UserInputError(
            where,
            f"inconsistent slice spacing: gaps between {gaps.min():.3f} and {gaps.max():.3f} mm "
            f"(a missing slice?)",
            f"evenly spaced slices (every slice within {tolerance:.3f} mm of a regular grid)",
        )
    return step


def _float_vector(header: Dataset, keyword: str, length: int, path: Path) -> np.ndarray:
    try:
        values = np.array([float(v) for v in header[keyword].value], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        values = np.array([])
    if values.shape != (length,) or not np.all(np.isfinite(values)):
        raise UserInputError(path, f"missing or malformed {keyword}", f"{length} numbers, as DICOM requires")
    return values


def stack_volume(stack: SliceStack) -> np.ndarray:
    volume = np.empty(stack.shape, dtype=np.float32)
    for index, path in enumerate(stack.paths):
        values = read_slice_values(path)
        if values.shape != (stack.rows, stack.columns):
            raise UserInputError(path, f"pixel data shape {values.shape} differs from Rows x Columns in the header")
        volume[:, :, index] = values.T  # [row, column] -> [column, row]
    return volume


def to_canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder axes (flips and permutations only, no resampling) to the closest RAS orientation."""
    image = nib.as_closest_canonical(nib.Nifti1Image(array, affine))
    return np.asanyarray(image.dataobj), image.affine



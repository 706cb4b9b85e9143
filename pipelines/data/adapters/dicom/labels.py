"""Labels for a CT/MR series: a NIfTI file in ``data.dicom.labels_dir`` (named by series UID or case id) or a
DICOM-SEG object under the root that references the series (read with highdicom, an optional extra). Labels
are never resampled: each must lie on its series' own voxel grid."""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from radsynth.configs.errors import UserInputError
from radsynth.configs.schema import DataSource

from ...io import read_image
from .case import DicomCase
from .errors import first_line
from .geometry import ORIENTATION_TOLERANCE, SliceStack, to_canonical

logger = logging.getLogger(__name__)

LABEL_AFFINE_TOLERANCE_MM = 1e-3
SEG_POSITION_TOLERANCE_MM = 0.05

HIGHDICOM_HINT = "pip install radsynth[dicom-seg] (highdicom), or set data.dicom.use_seg: false"


@dataclass
class LabelSource:
    path: Path
    kind: str  # "nifti" | "seg"


def find_label(case: DicomCase, data: DataSource, segs: list[Path]) -> LabelSource | None:
    nifti = find_nifti_label(case, data)
    if nifti is not None:
        if segs:
            logger.warning("DICOM: case %s has a NIfTI label and a DICOM-SEG; using the NIfTI label", case.case_id)
        return LabelSource(nifti, "nifti")
    if len(segs) > 1:
        raise UserInputError(
            case.where,
            f"{len(segs)} DICOM-SEG objects reference this series: {', '.join(str(p) for p in segs[:3])}",
            "one SEG per series (merge them into one, or move the others out of data.root)",
        )
    return LabelSource(segs[0], "seg") if segs else None


def find_nifti_label(case: DicomCase, data: DataSource) -> Path | None:
    if not data.dicom.labels_dir:
        return None
    folder = Path(data.dicom.labels_dir)
    if not folder.is_dir():
        raise UserInputError(folder, "labels folder not found", "data.dicom.labels_dir must be an existing folder")
    found = [folder / f"{stem}{suffix}" for stem in (case.series_uid, case.case_id) for suffix in (".nii.gz", ".nii")]
    found = [path for path in found if path.is_file()]
    if len(found) > 1:
        raise UserInputError(folder, f"several label files for case {case.case_id}", "one label file per series")
    return found[0] if found else None


def index_segs(seg_headers: list[tuple[Path, Dataset]]) -> dict[str, list[Path]]:
    by_series: dict[str, list[Path]] = defaultdict(list)
    for path, header in seg_headers:
        referenced = [str(item.SeriesInstanceUID) for item in header.get("ReferencedSeriesSequence", [])]
        if not referenced:
            logger.warning("DICOM: a DICOM-SEG object references no series and is ignored (%s)", path.name)
        for series_uid in referenced:
            by_series[series_uid].append(path)
    return by_series


def read_nifti_label(path: Path, image_shape: tuple[int, ...], image_affine: np.ndarray) -> np.ndarray:
    """A NIfTI label for a converted (canonical) image: any orientation, but the image's own voxel grid."""
    label = read_image(path)
    array, affine = to_canonical(label.array, label.affine)
    expected_shape = tuple(image_shape)
    if array.shape != expected_shape:
        raise UserInputError(
            path,
            f"label shape {array.shape} (RAS) does not match its DICOM series {expected_shape} (RAS)",
            "a label on the series' own voxel grid (no resampling is done)",
        )
    difference = float(np.abs(affine - image_affine).max())
    if difference > LABEL_AFFINE_TOLERANCE_MM:
        raise UserInputError(
            path,
            f"label affine differs from its DICOM series by up to {difference:.4g} mm (in RAS)",
            f"the series' own voxel-to-world affine, within {LABEL_AFFINE_TOLERANCE_MM} mm",
        )
    return array


def read_seg_label(path: Path, stack: SliceStack) -> tuple[np.ndarray, dict[int, str]]:
    """A DICOM-SEG as one label map [column, row, slice] on the series grid; values are segment numbers."""
    highdicom = _import_highdicom(path)
    try:
        seg = highdicom.seg.segread(path)
    except Exception as error:  # noqa: BLE001 - highdicom validates with many exception types
        problem = f"not a readable DICOM-SEG ({type(error).__name__}: {first_line(error)})"
        raise UserInputError(path, problem) from None
    _check_seg_grid(seg, stack, path)
    try:
        pixels = seg.get_pixels_by_source_instance(
            [str(header.SOPInstanceUID) for header in stack.headers],
            combine_segments=True,
            # Spatial alignment is verified above from the SEG's own plane positions; highdicom would refuse
            # SEGs that leave out the optional SpatialLocationsPreserved flag, which many writers do.
            ignore_spatial_locations=True,
            # SEG writers usually store only the frames where a segment is present.
            assert_missing_frames_are_empty=True,
        )
    except (RuntimeError, ValueError, KeyError) as error:
        raise UserInputError(
            path,
            f"cannot combine its segments into one label map ({first_line(error)})",
            "non-overlapping binary segments on the referenced series' images",
        ) from None
    names = {int(number): str(seg.get_segment_description(number).segment_label) for number in seg.segment_numbers}
    label = np.transpose(np.asarray(pixels), (2, 1, 0))  # [slice, row, column] -> [column, row, slice]
    return _smallest_label_dtype(label), {0: "background", **names}


def _import_highdicom(where: Path):
    try:
        import highdicom
    except ImportError:
        problem = "reading DICOM-SEG needs highdicom, which is not installed"
        raise UserInputError(where, problem, HIGHDICOM_HINT) from None
    return highdicom


def _check_seg_grid(seg: Dataset, stack: SliceStack, path: Path) -> None:
    """Each SEG frame must lie exactly on the slice it references: same size, orientation and position."""
    off_grid = "a SEG on the series' own pixel grid"
    if (int(seg.Rows), int(seg.Columns)) != (stack.rows, stack.columns):
        raise UserInputError(
            path, f"SEG frames are {seg.Rows}x{seg.Columns}, its series {stack.rows}x{stack.columns}", off_grid
        )
    orientation_of_series = np.array([float(v) for v in stack.headers[0].ImageOrientationPatient])
    position_of = {str(h.SOPInstanceUID): np.array([float(v) for v in h.ImagePositionPatient]) for h in stack.headers}
    shared = _first_item(seg, "SharedFunctionalGroupsSequence")
    matched_frames = 0
    for frame in seg.get("PerFrameFunctionalGroupsSequence", []):
        orientation = _functional_group_value(frame, shared, "PlaneOrientationSequence", "ImageOrientationPatient")
        if orientation is not None:
            if np.abs(np.array(orientation, float) - orientation_of_series).max() > ORIENTATION_TOLERANCE:
                raise UserInputError(path, "SEG frame orientation differs from its series", off_grid)
        position = _functional_group_value(frame, shared, "PlanePositionSequence", "ImagePositionPatient")
        for source in _frame_sources(frame, shared):
            if str(source.get("SpatialLocationsPreserved", "")).upper() == "NO":
                raise UserInputError(path, "SEG says its frames are not spatially aligned with the source images")
            expected = position_of.get(str(source.get("ReferencedSOPInstanceUID", "")))
            if expected is None:
                continue
            matched_frames += 1
            if position is not None:
                distance = float(np.linalg.norm(np.array(position, float) - expected))
                if distance > SEG_POSITION_TOLERANCE_MM:
                    raise UserInputError(path, "a SEG frame does not lie on the slice it references", off_grid)
    if matched_frames == 0:
        # Otherwise highdicom would return an all-background label map without a word.
        raise UserInputError(
            path, "no SEG frame references an image of its series", "a SEG derived from the series' own images"
        )


def _first_item(dataset: Dataset, keyword: str) -> Dataset | None:
    sequence = dataset.get(keyword)
    return sequence[0] if sequence else None


def _functional_group_value(frame: Dataset, shared: Dataset | None, sequence: str, keyword: str):
    for group in (frame, shared):
        item = _first_item(group, sequence) if group is not None else None
        if item is not None and keyword in item:
            return item[keyword].value
    return None


def _frame_sources(frame: Dataset, shared: Dataset | None) -> list[Dataset]:
    for group in (frame, shared):
        if group is None:
            continue
        sources = [
            source
            for derivation in group.get("DerivationImageSequence", [])
            for source in derivation.get("SourceImageSequence", [])
        ]
        if sources:
            return sources
    return []


def _smallest_label_dtype(label: np.ndarray) -> np.ndarray:
    if label.size and label.min() >= 0 and label.max() < 256:
        return label.astype(np.uint8)
    return label.astype(np.uint16) if label.size and label.min() >= 0 else label


def value_names(label: np.ndarray) -> dict[int, str]:
    """Names for a NIfTI label without its own: label_<value> for every value present."""
    values = [int(v) for v in np.unique(label) if v != 0 and float(v).is_integer()]
    return {0: "background", **{value: f"label_{value}" for value in values}}



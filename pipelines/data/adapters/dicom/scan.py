"""Finding the image series under a folder: walking the tree, reading and validating headers, grouping files
into cases, and the skip rules for series that are valid DICOM but not one image volume."""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    MRImageStorage,
)
from tqdm.auto import tqdm

from radsynth.configs.errors import UserInputError
from radsynth.configs.schema import DataSource, Modality

from .case import PROJECTION_MODALITIES, DicomCase
from .errors import first_line, unreadable
from .geometry import ORIENTATION_TOLERANCE, SPACING_ABSOLUTE_TOLERANCE_MM

logger = logging.getLogger(__name__)

MODALITY_OF: dict[str, Modality] = {"CT": "ct", "MR": "mri", "CR": "xray", "DX": "xray"}
SINGLE_FRAME_IMAGE_CLASSES = frozenset(
    {
        CTImageStorage,
        MRImageStorage,
        ComputedRadiographyImageStorage,
        DigitalXRayImageStorageForPresentation,
        DigitalXRayImageStorageForProcessing,
    }
)
ENHANCED_IMAGE_CLASSES = frozenset(
    {
        EnhancedCTImageStorage,
        EnhancedMRImageStorage,
        LegacyConvertedEnhancedCTImageStorage,
        LegacyConvertedEnhancedMRImageStorage,
    }
)
READ_IMAGE_CLASSES = SINGLE_FRAME_IMAGE_CLASSES | ENHANCED_IMAGE_CLASSES


# ------------------------------------------------------------------------------------------- scanning


def scan_headers(root: Path) -> tuple[list[tuple[Path, Dataset]], list[tuple[Path, Dataset]]]:
    """Every DICOM file's header under root, images and SEG objects apart; other files are skipped."""
    images, segs = [], []
    paths = sorted(path for path in root.rglob("*") if path.is_file())
    for path in tqdm(paths, desc="reading DICOM headers", unit="file", disable=None):
        header = _read_header(path)
        if header is None:
            continue
        if header.get("Modality") == "SEG":
            segs.append((path, header))
        elif "SeriesInstanceUID" in header:
            images.append((path, header))
    return images, segs


def _read_header(path: Path) -> Dataset | None:
    """The header of a DICOM Part 10 file; None for anything else, an error for a Part 10 file that is broken.

    pydicom reads truncated or garbled files without complaint (it stops where the bytes stop), so a file that
    announces itself as DICOM (the 'DICM' preamble) must also carry the attributes every image file has.
    """
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, force=False)
    except InvalidDicomError:
        if _has_dicom_preamble(path):
            raise unreadable(path, "invalid file meta information") from None
        return None  # not DICOM Part 10: notes, NIfTI files, anything else in the folder
    except Exception as error:  # noqa: BLE001 - pydicom raises many exception types on malformed bytes
        if _has_dicom_preamble(path):
            raise unreadable(path, f"{type(error).__name__}: {first_line(error)}") from None
        return None
    problem = _part10_problem(header)
    if problem:
        raise unreadable(path, problem)
    return header


def _has_dicom_preamble(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(132)[128:] == b"DICM"


def _part10_problem(header: Dataset) -> str | None:
    meta = getattr(header, "file_meta", None) or Dataset()
    if not meta.get("TransferSyntaxUID") or not meta.get("MediaStorageSOPClassUID"):
        return "no file meta information (transfer syntax, SOP class)"
    if meta.MediaStorageSOPClassUID not in READ_IMAGE_CLASSES:
        return None  # DICOMDIR, reports, presentation states, SEG: no image series of their own to break
    # A cut-off image file loses its trailing attributes; pixel data (always last) is checked when read.
    missing = [k for k in ("SOPInstanceUID", "SeriesInstanceUID", "Modality", "Rows", "Columns") if not header.get(k)]
    return f"missing {', '.join(missing)}" if missing else None


# ------------------------------------------------------------------------------------------- grouping


def group_series(
    headers: list[tuple[Path, Dataset]], data: DataSource
) -> tuple[list[DicomCase], Counter[str]]:
    by_series: dict[str, list[tuple[Path, Dataset]]] = defaultdict(list)
    for path, header in headers:
        by_series[str(header.SeriesInstanceUID)].append((path, header))

    cases: list[DicomCase] = []
    skipped: Counter[str] = Counter()
    for series_uid, members in by_series.items():
        first = members[0][1]
        modality = MODALITY_OF.get(str(first.get("Modality", "")))
        if modality is None:
            skipped[f"series of unsupported modality {first.get('Modality') or '(none)'}"] += 1
            continue
        if data.modality is not None and modality != data.modality:
            # data.modality selects which series to read: relabelling a CT as an MRI would be wrong.
            skipped[f"{modality} series (data.modality is {data.modality})"] += 1
            continue
        members = _drop_duplicate_instances(members)
        reason = _skip_reason(members, modality)
        if reason:
            skipped[reason] += 1
            continue
        if modality in PROJECTION_MODALITIES:
            cases.extend(_projection_cases(series_uid, modality, members))
        else:
            cases.append(_volume_case(series_uid, modality, members))
    return cases, skipped


def _drop_duplicate_instances(members: list[tuple[Path, Dataset]]) -> list[tuple[Path, Dataset]]:
    """The same instance copied twice into the folder is one slice, not two at one position."""
    unique: dict[str, tuple[Path, Dataset]] = {}
    for path, header in members:
        unique.setdefault(str(header.SOPInstanceUID), (path, header))
    if len(unique) < len(members):
        logger.warning("DICOM: ignored %d duplicate copies of instances", len(members) - len(unique))
    return list(unique.values())


def _skip_reason(members: list[tuple[Path, Dataset]], modality: Modality) -> str | None:
    """Series that are valid DICOM but not one image volume: warned about and left out, not errors."""
    headers = [header for _, header in members]
    sop_classes = {UID(str(header.get("SOPClassUID", ""))) for header in headers}
    other_classes = sop_classes - READ_IMAGE_CLASSES
    if other_classes:
        return f"{modality} series stored as {', '.join(sorted(str(c.name) for c in other_classes))}"
    if any("LOCALIZER" in _image_type(header) for header in headers):
        return "localizer series"
    if modality not in PROJECTION_MODALITIES:
        return _stack_skip_reason(headers)
    return None


def _stack_skip_reason(headers: list[Dataset]) -> str | None:
    """Several planes or several images per position: a multi-plane scout or a 4D series, not one volume."""
    try:
        orientations = np.array([[float(v) for v in h.ImageOrientationPatient] for h in headers])
        positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
    except (AttributeError, TypeError, ValueError):
        return None  # missing geometry is an error, raised with the file's name when the stack is built
    if orientations.shape[1:] != (6,) or positions.shape[1:] != (3,):
        return None
    if np.abs(orientations - orientations[0]).max() > ORIENTATION_TOLERANCE:
        return "series with slices in several orientations (multi-plane localizers)"
    normal = np.cross(orientations[0, :3], orientations[0, 3:])
    along_normal = np.sort(positions @ normal)
    if len(headers) > 1 and np.diff(along_normal).min() < SPACING_ABSOLUTE_TOLERANCE_MM:
        return "series with several images per slice position (multi-echo, multi-phase, diffusion)"
    return None


def _image_type(header: Dataset) -> tuple[str, ...]:
    value = header.get("ImageType") or ()
    return tuple(str(item).upper() for item in ([value] if isinstance(value, str) else value))


def _check_single_frame(members: list[tuple[Path, Dataset]]) -> None:
    for path, header in members:
        if int(header.get("NumberOfFrames") or 1) > 1:
            raise UserInputError(
                path,
                "multi-frame (enhanced) DICOM images are not supported",
                "single-frame CT/MR/CR/DX images (convert enhanced objects to NIfTI, e.g. with dcm2niix)",
            )


def _projection_cases(
    series_uid: str, modality: Modality, members: list[tuple[Path, Dataset]]
) -> list[DicomCase]:
    # A radiograph series often holds several views (PA and lateral): each image is its own case.
    _check_single_frame(members)
    return [
        DicomCase(str(header.SOPInstanceUID), series_uid, modality, [path], [header])
        for path, header in sorted(members, key=lambda member: str(member[0]))
    ]


def _volume_case(series_uid: str, modality: Modality, members: list[tuple[Path, Dataset]]) -> DicomCase:
    _check_single_frame(members)
    members = sorted(members, key=lambda member: str(member[0]))
    return DicomCase(series_uid, series_uid, modality, [p for p, _ in members], [h for _, h in members])


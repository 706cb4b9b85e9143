"""DICOM folders -> manifest records: CT/MR series become canonical (RAS) NIfTI volumes, CR/DX images PNGs.

One image series is one case (CT, MR); a projection radiograph (CR, DX) is one case per image. Labels come
from NIfTI files in ``data.dicom.labels_dir`` or from DICOM-SEG objects found under the root (read with
highdicom, an optional extra). Converted files go to ``work_dir/dicom-nifti`` with a small JSON sidecar that
records the digest of the source files, so an unchanged series is not converted twice.

Identifiers: case ids and patient ids are SHA-256 digests (of the UID; of dataset name + PatientID, keyed with
HMAC when RADSYNTH_PSEUDONYM_KEY is set, see ``records.pseudonymous_patient_id``), never UIDs or PatientIDs,
and no message or log line of this package carries a patient identifier or a UID. Folder and file names are the
user's own and appear in error messages as they are, so the user can find the file.

What is read, what is skipped (with a warning), what is an error:

- read: single-frame CT Image / MR Image series that form one regular 3D stack; CR/DX single-frame images.
- skipped: other modalities (SR, PR, RTSTRUCT, OT, ...), localizers, secondary captures, series with slices in
  several orientations (a multi-plane localizer) and series with several images at one position (multi-echo,
  multi-phase, diffusion): none of these is one 3D volume, and real study folders are full of them.
- error: a DICOM file that does not parse, a stack with uneven slice spacing (a missing slice), mixed image
  sizes or pixel spacings, a one-slice CT/MR series, multi-frame (enhanced) images, compressed pixel data
  without a decoder, a label whose geometry differs from its series, and a folder with nothing to read.

Modules, each with one job (imports run one way, top to bottom):

- ``errors``: the messages for unreadable files, shared by the readers below.
- ``case``: ``DicomCase``, one slice stack or one projection image, and its hashed case id.
- ``pixels``: one file's pixel data, decoded and rescaled (HU for CT).
- ``geometry``: the sorted slice stack, its LPS -> RAS affine, spacing checks, the volume and its RAS reorientation.
- ``scan``: walking the folder, reading and validating headers, grouping series into cases, skip rules.
- ``labels``: NIfTI labels and DICOM-SEG objects on a series' grid.
- ``sidecar``: the conversion cache (digest of the source files in a JSON sidecar).
- ``records``: the manifest record of a converted case: pseudonym, age, sex, spacing.
- ``convert``: one case converted (or its earlier conversion reused) and its record built.
- this package: ``read_dicom``, the entry point.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
from tqdm.auto import tqdm

from radsynth.configs.errors import UserInputError
from radsynth.configs.schema import DataSource

from ...manifest import CaseRecord
from .case import DicomCase
from .convert import convert_case
from .geometry import SliceStack, build_slice_stack, lps_to_ras, to_canonical
from .labels import index_segs, read_nifti_label, read_seg_label
from .pixels import read_slice_values
from .records import PSEUDONYM_KEY_ENV, age_in_years, pseudonymous_patient_id
from .scan import group_series, scan_headers

__all__ = [
    "CONVERTED_DIR",
    "PSEUDONYM_KEY_ENV",
    "DicomCase",
    "SliceStack",
    "age_in_years",
    "build_slice_stack",
    "lps_to_ras",
    "pseudonymous_patient_id",
    "read_dicom",
    "read_nifti_label",
    "read_seg_label",
    "read_slice_values",
    "to_canonical",
]

logger = logging.getLogger(__name__)

CONVERTED_DIR = "dicom-nifti"


def read_dicom(data: DataSource, work_dir: Path) -> list[CaseRecord]:
    with _pydicom_value_warnings_off():
        return _read_dicom(data, Path(work_dir))


@contextmanager
def _pydicom_value_warnings_off() -> Iterator[None]:
    """pydicom's validation warnings quote element values (birth dates, ages, UIDs): keep them out of logs.

    Nothing is lost: every value this adapter uses is parsed and checked here, with messages that quote none.
    """
    settings = pydicom.config.settings
    previous = settings.reading_validation_mode
    settings.reading_validation_mode = pydicom.config.IGNORE
    try:
        yield
    finally:
        settings.reading_validation_mode = previous


def _read_dicom(data: DataSource, work_dir: Path) -> list[CaseRecord]:
    root = Path(data.root)
    if not root.is_dir():
        raise UserInputError(root, "DICOM root folder not found", "data.root must be an existing folder")
    headers, seg_headers = scan_headers(root)
    series, skipped = group_series(headers, data)
    if not series:
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(skipped.items())) or "no DICOM files"
        raise UserInputError(
            root,
            f"no usable DICOM image series found ({reasons})",
            "CT or MR image series of 2+ slices, or CR/DX images" + _modality_filter_hint(data),
        )
    for reason, count in sorted(skipped.items()):
        logger.warning("DICOM: skipped %d %s", count, reason)

    segs_by_series = index_segs(seg_headers) if data.dicom.use_seg else {}
    out_dir = work_dir / CONVERTED_DIR
    records = [
        convert_case(case, data, out_dir, segs_by_series.get(case.series_uid, []))
        for case in tqdm(series, desc="converting DICOM", unit="series", disable=None)
    ]
    return sorted(records, key=lambda record: record.case_id)


def _modality_filter_hint(data: DataSource) -> str:
    return f" with modality {data.modality} (data.modality)" if data.modality else ""


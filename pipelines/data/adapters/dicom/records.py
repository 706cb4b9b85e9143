"""Manifest records for converted cases: geometry read back from the written file, and the few header
attributes kept, identifying ones reduced (patient pseudonym, age capped at 90)."""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

import nibabel as nib
from pydicom.dataset import Dataset

from radsynth.configs.schema import DataSource

from ...io import spacing_of
from ...manifest import CaseRecord
from .case import DicomCase
from .sidecar import Converted

# HIPAA Safe Harbor: ages over 89 are identifying and are reported as one "90 or older" group.
MAX_REPORTED_AGE = 90
AGE_UNITS_PER_YEAR = {"Y": 1.0, "M": 12.0, "W": 52.1775, "D": 365.25}

# Secret key for patient pseudonyms (HMAC-SHA256); unset or empty: a plain, recomputable SHA-256.
PSEUDONYM_KEY_ENV = "RADSYNTH_PSEUDONYM_KEY"


def build_record(case: DicomCase, data: DataSource, converted: Converted, sha256: str) -> CaseRecord:
    header = case.headers[0]
    spacing, shape = _converted_geometry(converted.image, header)
    attributes = {
        "sex": _sex(header),
        "age": age_in_years(header.get("PatientAge")),
        "slice_thickness": _optional_float(header.get("SliceThickness")),
    }
    if case.is_projection:
        attributes["view"] = str(header.get("ViewPosition") or "").strip().upper() or None
    return CaseRecord(
        case_id=case.case_id,
        patient_id=pseudonymous_patient_id(data.name, header),
        modality=case.modality,
        body_region=data.body_region or str(header.get("BodyPartExamined") or "").strip().lower() or "unknown",
        image=str(converted.image),
        label=str(converted.label) if converted.label else None,
        label_names=data.label_names or converted.label_names,
        spacing=spacing,
        shape=shape,
        text=str(header.get("SeriesDescription") or header.get("StudyDescription") or "").strip(),
        attributes=attributes,
        source="dicom",
        license=data.license,
        sha256=sha256,
        origin="real",
        split=None,
    )


def _converted_geometry(image: Path, header: Dataset) -> tuple[tuple[float, ...], tuple[int, ...]]:
    if image.name.endswith(".nii.gz"):
        loaded = nib.load(str(image))  # header only: the voxels stay on disk
        return spacing_of(loaded.affine), tuple(int(n) for n in loaded.shape)
    rows, columns = int(header.Rows), int(header.Columns)
    return _projection_spacing(header), (rows, columns)


def _projection_spacing(header: Dataset) -> tuple[float, float]:
    """(between rows, between columns) in mm; radiographs often give only the detector (imager) spacing."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = header.get(keyword)
        if value is not None and len(value) == 2 and all(float(v) > 0 for v in value):
            return float(value[0]), float(value[1])
    return 1.0, 1.0


def pseudonymous_patient_id(dataset_name: str, header: Dataset) -> str:
    """A stable per-dataset patient key so splits keep a patient's cases together.

    This is a pseudonym, not anonymisation. Without a key it is a plain SHA-256 of dataset name and PatientID,
    which anyone who knows or can enumerate PatientIDs (hospital record numbers are short) and the dataset name
    can recompute. With ``RADSYNTH_PSEUDONYM_KEY`` set (non-empty) it is an HMAC-SHA256 keyed with that value,
    which cannot be recomputed without the key.

    Set a key for real patient data and keep it secret: out of the manifest, the configs, logs and version
    control. Use the same key for every ingest of a dataset: another key (or none) gives every patient a new
    pseudonym, so the cases of one patient are no longer recognised as one and splits do not stay stable. The
    manifest stays internal either way.
    """
    patient = str(header.get("PatientID") or "").strip()
    if not patient:
        # Without a PatientID the study is the narrowest unit known to be one patient.
        patient = "study:" + str(header.get("StudyInstanceUID") or header.SeriesInstanceUID)
    message = f"{dataset_name}:{patient}".encode()
    key = os.environ.get(PSEUDONYM_KEY_ENV, "")
    if key:
        digest = hmac.new(key.encode(), message, hashlib.sha256).hexdigest()
    else:
        digest = hashlib.sha256(message).hexdigest()
    return "pat_" + digest[:16]


def age_in_years(value: object) -> int | None:
    """DICOM AS values ("064Y", "006M", "012W", "003D") in whole years, capped at 90 (HIPAA Safe Harbor)."""
    text = str(value or "").strip().upper()
    if len(text) != 4 or not text[:3].isdigit() or text[3] not in AGE_UNITS_PER_YEAR:
        return None
    return min(int(int(text[:3]) / AGE_UNITS_PER_YEAR[text[3]]), MAX_REPORTED_AGE)


def _sex(header: Dataset) -> str | None:
    value = str(header.get("PatientSex") or "").strip().upper()
    return value if value in ("M", "F", "O") else None


def _optional_float(value: object) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None

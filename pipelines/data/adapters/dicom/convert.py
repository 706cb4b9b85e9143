"""Converting one case: its label found, its source digest taken, then the cached conversion reused or the
series written as a canonical NIfTI volume (CT/MR) or a 16-bit PNG (CR/DX), and its record built."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from radsynth.configs.schema import DataSource

from ...io import write_nifti, write_png
from ...manifest import CaseRecord, file_sha256
from .case import DicomCase
from .geometry import build_slice_stack, stack_volume, to_canonical
from .labels import LabelSource, find_label, find_nifti_label, read_nifti_label, read_seg_label, value_names
from .pixels import read_slice_values
from .records import build_record
from .sidecar import Converted, reuse, write_sidecar

logger = logging.getLogger(__name__)


def convert_case(case: DicomCase, data: DataSource, out_dir: Path, segs: list[Path]) -> CaseRecord:
    label_source = None if case.is_projection else find_label(case, data, segs)
    if case.is_projection and (segs or find_nifti_label(case, data)):
        logger.warning("DICOM: labels for X-ray image %s are not supported and were ignored", case.case_id)
    source_files = sorted(case.paths, key=str)
    sha256 = file_sha256(*source_files, label_source.path if label_source else None)

    converted = reuse(out_dir, case.case_id, sha256)
    if converted is None:
        if case.is_projection:
            converted = _convert_projection(case, out_dir)
        else:
            converted = _convert_volume(case, label_source, out_dir)
        write_sidecar(out_dir, case.case_id, sha256, converted)
    return build_record(case, data, converted, sha256)


def _convert_volume(case: DicomCase, label_source: LabelSource | None, out_dir: Path) -> Converted:
    stack = build_slice_stack(case)
    volume, affine = to_canonical(stack_volume(stack), stack.affine_ras)
    image_path = write_nifti(out_dir / f"{case.case_id}.nii.gz", volume, affine)
    label_path = out_dir / f"{case.case_id}_label.nii.gz"
    if label_source is None:
        label_path.unlink(missing_ok=True)  # a label removed since the last conversion must not linger
        return Converted(image_path, None, {0: "background"})
    if label_source.kind == "nifti":
        label = read_nifti_label(label_source.path, volume.shape, affine)
        names = value_names(label)
    else:
        grid_label, names = read_seg_label(label_source.path, stack)
        label, _ = to_canonical(grid_label, stack.affine_ras)
    return Converted(image_path, write_nifti(label_path, label, affine), names)


def _convert_projection(case: DicomCase, out_dir: Path) -> Converted:
    values = read_slice_values(case.paths[0])
    if str(case.headers[0].get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        values = values.max() + values.min() - values  # MONOCHROME1 shows low values bright; store bright = high
    values = values - min(float(values.min()), 0.0)  # X-ray values have no physical unit: shift, never clip low
    pixels = np.clip(np.rint(values), 0, np.iinfo(np.uint16).max).astype(np.uint16)
    image_path = write_png(out_dir / f"{case.case_id}.png", pixels)
    return Converted(image_path, None, {0: "background"})



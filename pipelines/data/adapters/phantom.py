"""Adapter for the built-in procedural phantoms: generate a cohort once, write it as files, return records.

The files land in a folder named after everything that determines them (kind, seed, case count, grid), and
the manifest ``cases.jsonl`` is written last and atomically, so its presence means the folder is complete: a
second call reuses the folder instead of drawing the cohort again, and an interrupted run is simply redone.
Phantoms are synthetic (``origin="phantom"``): no patient data, public domain.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from radsynth.configs.schema import DataSource, PhantomSource

from ..io import scaling_affine, write_nifti, write_png
from ..manifest import CaseRecord, file_sha256, read_manifest, write_manifest
from ..phantoms import CohortSlot, PhantomCase, generate_case, grid_shape, kind_module, plan_cohort
from ..phantoms.cohort import GENERATOR_VERSION

MANIFEST_NAME = "cases.jsonl"
PHANTOM_LICENSE = "CC0-1.0 (radsynth procedural phantom)"
NIFTI_DESCRIPTION = "radsynth phantom (not patient data)"


def read_phantom(data: DataSource, work_dir: Path) -> list[CaseRecord]:
    """Records for ``data.phantom``'s cohort, generating and writing it under ``work_dir`` unless already there.

    ``data.modality``, ``data.body_region``, ``data.license`` and ``data.label_names`` do not apply: a phantom
    kind fixes its own modality, region, label names and licence.
    """
    source = data.phantom
    folder = Path(work_dir) / phantom_folder_name(source)
    existing = _complete_manifest(folder, source.n_cases)
    if existing is not None:
        return existing
    # One process, in order: a case takes milliseconds, mostly in small GIL-bound numpy calls, so threads
    # measured slower and a process pool's start-up (and fork hazards inside Prefect) would not pay off.
    slots = plan_cohort(source.kind, source.n_cases, source.seed)
    progress = tqdm(slots, desc=f"phantom {source.kind}", unit="case", leave=False, disable=None)
    records = [_write_case(source, slot, folder) for slot in progress]
    write_manifest(records, folder / MANIFEST_NAME)
    return records


def phantom_folder_name(source: PhantomSource) -> str:
    grid = grid_shape(source.kind, source.size, source.shape)
    grid_name = str(grid[0]) if len(grid) == 2 else "x".join(map(str, grid))
    return f"phantom-{source.kind}-v{GENERATOR_VERSION}-{source.seed}-{source.n_cases}-{grid_name}"


def _complete_manifest(folder: Path, n_cases: int) -> list[CaseRecord] | None:
    """The folder's records if its manifest lists every case and every file is there, else None."""
    manifest = folder / MANIFEST_NAME
    if not manifest.is_file():
        return None
    records = read_manifest(manifest)
    files_present = all(Path(r.image).is_file() and (r.label is None or Path(r.label).is_file()) for r in records)
    return records if len(records) == n_cases and files_present else None


def _write_case(source: PhantomSource, slot: CohortSlot, folder: Path) -> CaseRecord:
    grid = grid_shape(source.kind, source.size, source.shape)
    case = generate_case(source.kind, slot, source.seed, grid)
    if len(grid) == 2:
        image_path, label_path = _write_png_pair(case, folder)
    else:
        image_path, label_path = _write_nifti_pair(case, folder, source.kind)
    module = kind_module(source.kind)
    return CaseRecord(
        case_id=case.case_id,
        patient_id=case.patient_id,
        modality=module.MODALITY,
        body_region=module.BODY_REGION,
        image=str(image_path),
        label=str(label_path),
        label_names=case.label_names,
        spacing=case.spacing,
        shape=case.image.shape,
        text=case.text,
        attributes=case.attributes,
        split=None,
        source="phantom",
        license=PHANTOM_LICENSE,
        sha256=file_sha256(image_path, label_path),
        origin="phantom",
    )


def _write_png_pair(case: PhantomCase, folder: Path) -> tuple[Path, Path]:
    """16-bit image (the [0, 1] intensities at full PNG precision) and an 8-bit label map."""
    image = np.round(np.clip(case.image, 0.0, 1.0) * 65535).astype(np.uint16)
    image_path = write_png(folder.resolve() / "images" / f"{case.case_id}.png", image)
    label_path = write_png(folder.resolve() / "labels" / f"{case.case_id}.png", case.label.astype(np.uint8))
    return image_path, label_path


def _write_nifti_pair(case: PhantomCase, folder: Path, kind: str) -> tuple[Path, Path]:
    """Image and label share one affine: voxel sizes on the diagonal (RAS), origin at the volume's centre."""
    affine = scaling_affine(case.spacing)
    affine[:3, 3] = -0.5 * (np.asarray(case.image.shape) - 1) * np.asarray(case.spacing)
    # CT is stored as integer HU, as scanners do; it also compresses three times better than float32.
    image = np.round(case.image).astype(np.int16) if kind == "ct_torso" else case.image.astype(np.float32)
    image_path = folder.resolve() / "images" / f"{case.case_id}.nii.gz"
    label_path = folder.resolve() / "labels" / f"{case.case_id}.nii.gz"
    write_nifti(image_path, image, affine, NIFTI_DESCRIPTION)
    write_nifti(label_path, case.label.astype(np.uint8), affine, NIFTI_DESCRIPTION)
    return image_path, label_path


ABDOMINAL_ORGANS = ("liver", "spleen", "right_kidney", "left_kidney")
MSD_CHANNEL_NAMES = {"ct": "CT", "mri": "MRI", "xray": "XRAY"}  # dataset.json's modality entry, as MSD spells it


def write_msd_folder(root: str | Path, kind: str, n_cases: int, seed: int, shape, ids_of: str | None = None,
                     axial_slice: bool = False) -> Path:
    """A phantom cohort as an MSD raw folder (imagesTr/, labelsTr/, dataset.json naming modality and labels), what
    ``radsynth translate --source`` reads. ids_of: name the cases as that kind's cohort of the same seed names them
    (``ct_torso`` and ``mri_torso`` draw the same anatomy, so each is the other's paired truth under one case id).
    axial_slice: write each volume's axial slice where the abdominal organs show most, as a 2D image (2D data for 2D
    models)."""
    root, module = Path(root), kind_module(kind)
    prefix = f"_{module.CASE_PREFIX}_"
    renamed = f"_{kind_module(ids_of).CASE_PREFIX}_" if ids_of else prefix
    abdominal = [value for value, name in module.LABEL_NAMES.items() if name in ABDOMINAL_ORGANS]
    for slot in plan_cohort(kind, n_cases, seed):
        case = generate_case(kind, slot, seed, grid_shape(kind, shape[0], shape))
        image, label = case.image, case.label
        if axial_slice:  # the 2D NIfTI keeps the volume's affine: its in-plane part is the slice's geometry
            depth = int(np.argmax(np.isin(label, abdominal).sum(axis=(0, 1))))
            image, label = image[..., depth], label[..., depth]
        case_id, affine = case.case_id.replace(prefix, renamed), scaling_affine(case.spacing)
        write_nifti(root / "imagesTr" / f"{case_id}.nii.gz", image.astype(np.float32), affine, NIFTI_DESCRIPTION)
        write_nifti(root / "labelsTr" / f"{case_id}.nii.gz", label.astype(np.uint8), affine, NIFTI_DESCRIPTION)
    meta = {"name": f"phantom-{kind}", "modality": {"0": MSD_CHANNEL_NAMES[module.MODALITY]}, "licence": PHANTOM_LICENSE,
            "labels": {str(value): name for value, name in module.LABEL_NAMES.items()}}
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return root

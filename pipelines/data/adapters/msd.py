"""Medical Segmentation Decathlon and nnU-Net v2 raw folders.

Both keep images in ``imagesTr`` and labels in ``labelsTr``. MSD names them alike (``case.nii.gz``);
nnU-Net v2 adds a channel suffix to images (``case_0000.nii.gz``). ``dataset.json`` gives label names and
modality in either dialect (MSD ``{"0": "background"}`` / nnU-Net ``{"background": 0}``); without it the
config must give ``data.label_names``. Neither format records patients, so each case is its own patient:
say so in the dataset's card when several scans of one person may be present.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from radsynth.configs.errors import UserInputError
from radsynth.configs.schema import DataSource

from ..io import NIFTI_SUFFIXES, strip_image_suffix
from ..manifest import CaseRecord, checked_case_id, file_sha256
from .header import nifti_geometry

CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
MODALITY_NAMES = {"ct": "ct", "mri": "mri", "mr": "mri", "t1": "mri", "t2": "mri", "flair": "mri", "xray": "xray"}


def read_msd(data: DataSource, work_dir: Path) -> list[CaseRecord]:
    root = Path(data.root)
    images_dir, labels_dir = root / data.msd.images_dir, root / data.msd.labels_dir
    if not images_dir.is_dir():
        raise UserInputError(images_dir, "folder not found", "an MSD / nnU-Net raw folder has imagesTr/ and labelsTr/")
    meta = _read_dataset_json(root / "dataset.json")
    label_names = data.label_names or _label_names(meta, root / "dataset.json")
    modality = data.modality or _modality(meta, root / "dataset.json")
    region = data.body_region or "unknown"

    records = []
    for case_id, image_path in image_cases(images_dir):
        label_path = _label_for(labels_dir, case_id)
        shape, spacing = nifti_geometry(image_path)
        records.append(
            CaseRecord(
                case_id=case_id,
                patient_id=case_id,
                modality=modality,
                body_region=region,
                image=str(image_path),
                label=str(label_path) if label_path else None,
                label_names=label_names,
                spacing=spacing,
                shape=shape,
                text=f"{modality.upper()} of the {region.replace('_', ' ')}",
                source=meta.get("name") or data.name,
                license=_license(data, meta),
                sha256=file_sha256(image_path, label_path),
            )
        )
    return records


def image_cases(images_dir: Path) -> list[tuple[str, Path]]:
    """(case id, image path) pairs; nnU-Net's _0000 suffix is dropped, extra channels are refused."""
    cases = {}
    for path in sorted(images_dir.iterdir()):
        if path.name.startswith(".") or not path.name.lower().endswith(NIFTI_SUFFIXES):
            continue  # macOS '._' resource forks ship inside the original MSD tarballs
        stem = strip_image_suffix(path.name)
        match = CHANNEL_SUFFIX.match(stem)
        if match and match["channel"] != "0000":
            raise UserInputError(path, f"channel {match['channel']} found", "one channel per case (_0000 only)")
        case_id = checked_case_id(match["case"] if match else stem, path, "case id (the file name)")
        if case_id in cases:
            raise UserInputError(path, f"duplicate case id '{case_id}' (also {cases[case_id].name})",
                                 "one image file per case")
        cases[case_id] = path
    return list(cases.items())


def _label_for(labels_dir: Path, case_id: str) -> Path | None:
    if not labels_dir.is_dir():
        return None
    for suffix in NIFTI_SUFFIXES:
        candidate = labels_dir / f"{case_id}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _license(data: DataSource, meta: dict) -> str:
    if data.license != "unknown":
        return data.license
    return str(meta.get("licence") or meta.get("license") or "unknown")  # MSD spells it 'licence'


def _read_dataset_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserInputError(path, f"not valid JSON ({error.msg} at line {error.lineno})",
                             "an MSD or nnU-Net v2 dataset.json") from None
    if not isinstance(meta, dict):
        raise UserInputError(path, f"is a JSON {type(meta).__name__}", "an object with 'labels' (and 'channel_names')")
    if not isinstance(meta.get("labels", {}), dict) or not isinstance(meta.get("channel_names", {}), dict):
        raise UserInputError(path, "'labels' and 'channel_names' must be objects", "MSD or nnU-Net v2 dataset.json")
    return meta


def _label_names(meta: dict, where: Path) -> dict[int, str]:
    labels = meta.get("labels")
    if not labels:
        raise UserInputError(where, "no label names: dataset.json is missing or has no 'labels'",
                             "add dataset.json or set data.label_names in the config")
    try:
        if all(str(key).isdigit() for key in labels):  # MSD: {"0": "background", "1": "tumour"}
            names = {int(key): str(name) for key, name in labels.items()}
        else:  # nnU-Net v2: {"background": 0, "tumour": 1}; region-based labels are lists and unsupported
            names = {int(value): str(name) for name, value in labels.items()}
    except (TypeError, ValueError):
        raise UserInputError(where, "'labels' must map integers to names",
                             "region-based labels are not supported") from None
    names[0] = "background"
    return dict(sorted(names.items()))


def _modality(meta: dict, where: Path) -> str:
    channels = meta.get("channel_names") or meta.get("modality") or {}
    name = str(channels.get("0", "")).lower()
    if name in MODALITY_NAMES:
        return MODALITY_NAMES[name]
    raise UserInputError(where, f"cannot tell the modality from dataset.json (channel 0 is {name!r})",
                         "set data.modality to ct, mri or xray")

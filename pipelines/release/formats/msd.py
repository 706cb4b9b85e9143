"""Medical Segmentation Decathlon layout: ``imagesTr/<id>.nii.gz``, ``labelsTr/<id>.nii.gz`` and ``dataset.json``
with ``training`` pairs, which MONAI's ``load_decathlon_datalist`` and nnU-Net's MSD converter read.

Always NIfTI (MSD has no other file type): a 2D sample becomes a one-slice volume.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from radsynth.pipelines.data.io import write_json
from radsynth.pipelines.release.samples import DatasetInfo, ReleaseSample

from .nnunet import CHANNEL_NAMES
from .pairs import NIFTI_ENDING, write_pair


def write_msd(samples: Sequence[ReleaseSample], out_dir: Path, info: DatasetInfo) -> list[Path]:
    paths, training = [], []
    for sample in samples:
        file_name = f"{sample.sample_id}{NIFTI_ENDING}"
        pair = write_pair(sample, out_dir / "imagesTr" / file_name, out_dir / "labelsTr" / file_name)
        paths += pair.paths
        entry = {"image": f"./imagesTr/{file_name}", "label": f"./labelsTr/{file_name}"}
        training.append({**entry, "is_synthetic": sample.is_synthetic, "derived_from_real": sample.derived_from_real})
    names = {0: "background", **info.label_names}
    dataset = {
        "name": info.name,
        "description": info.description,
        "licence": info.license,  # MSD's spelling
        "modality": {"0": CHANNEL_NAMES[info.modality]},
        "labels": {str(value): names[value] for value in sorted(names)},
        "numTraining": len(training),
        "numTest": 0,
        "training": training,
        "test": [],
    }
    paths.append(write_json(out_dir / "dataset.json", dataset))
    return paths

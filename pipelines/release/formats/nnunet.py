"""nnU-Net v2 raw dataset: ``imagesTr/<case>_0000<ending>``, ``labelsTr/<case><ending>``, ``dataset.json``.

The caller names the folder (``Dataset<NNN>_<Name>``). Synthetic cases are ``syn_<id>``, real ones ``real_<id>``;
with real cases a ``splits_final.json`` validates on real cases only (synthetic ones always train), so a model
trained on the mix is judged on real anatomy. nnU-Net looks for it in its preprocessed folder: copy it there.
2D X-ray is stored as 16-bit PNG (nnU-Net's NaturalImage2DIO reads it as is); everything else as NIfTI.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from radsynth.pipelines.data.io import write_json
from radsynth.pipelines.release.samples import DatasetInfo, ReleaseSample

from .pairs import image_ending, write_pair

SYNTHETIC_PREFIX = "syn_"
REAL_PREFIX = "real_"
NUM_FOLDS = 5
# nnU-Net picks CT normalisation (global HU percentiles) for a channel named "CT", z-score for any other name.
CHANNEL_NAMES = {"ct": "CT", "mri": "MRI", "xray": "XRay"}


def write_nnunet(
    samples: Sequence[ReleaseSample], out_dir: Path, info: DatasetInfo, real: Sequence[ReleaseSample] = ()
) -> list[Path]:
    ending = image_ending(info)
    cases = named_cases([*samples, *real])
    paths = []
    for case, sample in cases.items():
        pair = write_pair(sample, out_dir / "imagesTr" / f"{case}_0000{ending}", out_dir / "labelsTr" / f"{case}{ending}")
        paths += pair.paths
    paths.append(write_json(out_dir / "dataset.json", dataset_json(cases, info, ending)))
    if any(not sample.is_synthetic for sample in cases.values()):
        paths.append(write_json(out_dir / "splits_final.json", real_validation_folds(cases)))
    return paths


def case_name(sample: ReleaseSample) -> str:
    # The sidecar decides, not the argument a case came in: a synthetic case can never be named real_ and
    # end up validating.
    prefix = SYNTHETIC_PREFIX if sample.is_synthetic else REAL_PREFIX
    return sample.sample_id if sample.sample_id.startswith(prefix) else prefix + sample.sample_id


def named_cases(samples: Sequence[ReleaseSample]) -> dict[str, ReleaseSample]:
    cases: dict[str, ReleaseSample] = {}
    for sample in samples:
        name = case_name(sample)
        if name in cases:
            raise ValueError(f"two samples become nnU-Net case '{name}'; sample ids must be unique")
        cases[name] = sample
    return cases


def dataset_json(cases: dict[str, ReleaseSample], info: DatasetInfo, ending: str) -> dict[str, object]:
    names = {0: "background", **info.label_names}
    return {
        "name": info.name,
        "description": info.description,
        "licence": info.license,
        "channel_names": {"0": CHANNEL_NAMES[info.modality]},
        "labels": {names[value]: value for value in sorted(names)},  # nnU-Net v2 maps name -> value
        "numTraining": len(cases),
        "file_ending": ending,
        "radsynth_is_synthetic_prefix": SYNTHETIC_PREFIX,
        "radsynth_real_prefix": REAL_PREFIX,
        "radsynth_synthetic_cases": sum(sample.is_synthetic for sample in cases.values()),
        "radsynth_derived_from_real_cases": sorted(case for case, sample in cases.items() if sample.derived_from_real),
    }


def real_validation_folds(cases: dict[str, ReleaseSample]) -> list[dict[str, list[str]]]:
    """Up to 5 folds over the real patients (a patient's cases stay in one fold); synthetic cases always train."""
    by_patient: dict[str, list[str]] = defaultdict(list)
    for case, sample in cases.items():
        if not sample.is_synthetic:
            by_patient[str(sample.sidecar.get("patient_id", case))].append(case)
    patients = sorted(by_patient)
    folds = []
    for fold in range(min(NUM_FOLDS, len(patients))):
        validation = sorted(case for patient in patients[fold::NUM_FOLDS] for case in by_patient[patient])
        folds.append({"train": sorted(set(cases) - set(validation)), "val": validation})
    return folds

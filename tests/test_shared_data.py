"""Ingest of the real reference sets in ../shared/data (skipped when the folder is absent)."""

from collections import Counter

import pytest

from radsynth.configs import load_config
from radsynth.pipelines.data.ingest import ingest

pytestmark = pytest.mark.shared_data


def patient_splits(records):
    splits_of = {}
    for record in records:
        splits_of.setdefault(record.patient_id, set()).add(record.split)
    return splits_of


def test_hippocampus_msd_folder_gives_208_cases_in_patient_disjoint_splits(shared_data, tmp_path):
    config = load_config("hippocampus", [f"data.root={shared_data / 'msd-hippocampus'}",
                                         f"runtime.output_dir={tmp_path}", "runtime.num_workers=2"])
    result = ingest(config, progress=False)
    assert len(result.records) == 208
    assert all(len(splits) == 1 for splits in patient_splits(result.records).values())
    counts = Counter(record.split for record in result.records)
    assert counts["train"] > counts["holdout"] > 0 and counts["test"] > 0
    assert result.summary["preprocessed_shape"] == [48, 64, 48]
    assert result.summary["label_fraction_train"]["anterior_hippocampus"] > 0.005
    assert result.summary["licenses"] == {"CC BY-SA 4.0": 208}


def test_chest_xray_folder_gives_90_images_with_masks_split_by_patientid(shared_data, tmp_path):
    config = load_config("cxr", [f"data.root={shared_data / 'cxr-covid-lungs-256'}",
                                 "data.preprocess.target_shape=[64, 64]", f"runtime.output_dir={tmp_path}"])
    result = ingest(config, progress=False)
    records = result.records
    assert len(records) == 90 and all(record.label is not None for record in records)
    assert len({record.patient_id for record in records}) == 48
    assert all(len(splits) == 1 for splits in patient_splits(records).values())
    assert {record.origin for record in records} == {"real"}
    assert 0.2 < result.summary["label_fraction_train"]["lung"] < 0.5  # lungs cover about a third of a CXR
    assert set(result.summary["attributes"]["view"]) >= {"PA", "AP Supine"}

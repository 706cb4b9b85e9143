import json

import numpy as np
import pytest

from radsynth.configs import load_config
from radsynth.flows.cli import main
from radsynth.pipelines.data.cache import read_cached_case
from radsynth.pipelines.data.ingest import ingest
from radsynth.pipelines.data.manifest import read_manifest

from .conftest import REPO, write_image_folder


@pytest.mark.parametrize("dialect", ["msd", "nnunet"])
def test_msd_and_nnunet_folders_become_a_manifest_with_cached_tensors(msd_config, dialect):
    config = msd_config(dialect=dialect)
    result = ingest(config, progress=False)
    records = read_manifest(result.manifest_path)
    assert [r.case_id for r in records] == [f"case_{i:03d}" for i in range(6)]
    assert records[0].label_names == {0: "background", 1: "organ", 2: "lesion"}
    assert records[0].modality == ("mri" if dialect == "msd" else "ct")
    assert records[0].spacing == (1.5, 1.0, 2.0) and records[0].shape == (12, 14, 10)
    assert all(len(r.sha256) == 64 for r in records)
    case = read_cached_case(result.cache_dir / "case_000.safetensors")
    assert case.image.shape == (1, 16, 16, 16) and case.image.dtype == np.float32
    assert case.label.dtype == np.uint8 and set(np.unique(case.label)) == {0, 1, 2}
    np.testing.assert_allclose(np.linalg.norm(case.affine[:3, :3], axis=0), [1.5, 1.5, 1.5])
    # Image and label still line up after reorientation and resampling: the lesion is the bright part.
    assert case.image[case.label == 2].mean() > case.image[case.label == 1].mean() > case.image[case.label == 0].mean()
    assert result.summary["splits"]["train"]["cases"] + result.summary["splits"]["holdout"]["cases"] \
        + result.summary["splits"]["test"]["cases"] == 6


def test_second_ingest_reuses_the_cache_and_a_changed_config_starts_a_new_one(msd_config):
    first = ingest(msd_config(), progress=False)
    assert first.preprocessed == 6
    again = ingest(msd_config(), progress=False)
    assert again.preprocessed == 0 and again.cache_dir == first.cache_dir
    resized = ingest(msd_config("data.preprocess.target_shape=[8,8,8]"), progress=False)
    assert resized.preprocessed == 6 and resized.cache_dir != first.cache_dir


def test_a_changed_file_is_preprocessed_again(msd_config, tmp_path):
    config = msd_config()
    ingest(config, progress=False)
    image = tmp_path / "msd" / "imagesTr" / "case_002.nii.gz"
    import nibabel as nib
    volume = nib.load(image)
    nib.save(nib.Nifti1Image(np.asanyarray(volume.dataobj) * 2, volume.affine), image)
    assert ingest(config, progress=False).preprocessed == 1


@pytest.mark.parametrize("bits, suffix", [(16, ".png"), (8, ".png"), (8, ".jpg")])
def test_image_folder_with_pngs_or_jpegs_masks_and_csv_attributes(tmp_path, bits, suffix):
    root = write_image_folder(tmp_path / "cxr", bits=bits, suffix=suffix)
    config = load_config(REPO / "configs" / "cxr.yaml", [
        f"data.root={root}", "data.image_folder.attribute_columns=[finding, sex, age]",
        "data.image_folder.text_column=report", "data.preprocess.target_shape=[16,16]",
        "conditioning.attributes=[finding, sex]", f"runtime.output_dir={tmp_path / 'run'}"])
    result = ingest(config, progress=False)
    records = {r.case_id: r for r in result.records}
    assert len(records) == 8 and len({r.patient_id for r in records.values()}) == 4
    first = records["img000"]
    assert first.attributes == {"finding": "nodule", "sex": "M", "age": 40}
    assert first.text == "chest film 0" and first.shape == (40, 36) and first.label.endswith("img000.png")
    case = read_cached_case(result.cache_dir / "img000.safetensors")
    assert set(np.unique(case.label)) == {0, 1}  # 0/255 masks binarised
    # The blob (label 1) is brighter than the background in every encoding, after preprocessing too.
    assert case.image[case.label == 1].mean() > case.image[case.label == 0].mean() + 0.5
    assert result.summary["attributes"]["finding"] == {"none": 6, "nodule": 2}


def test_ingest_cli_json_reports_paths_and_counts_on_its_last_line(msd_config, capsys, tmp_path):
    config = msd_config()
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config.model_dump(mode="json")))  # JSON is YAML
    assert main(["ingest", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["command"] == "ingest" and report["dataset_cases"] == 6 and report["preprocessed_now"] == 6
    assert (tmp_path / "run" / "data" / "manifest.jsonl").samefile(report["manifest"])


def test_summary_label_fractions_and_intensity_reference_match_the_cached_train_cases(msd_config):
    result = ingest(msd_config(), progress=False)
    train = [r for r in result.records if r.split == "train"]
    cases = [read_cached_case(result.cache_dir / f"{r.case_id}.safetensors") for r in train]
    labels = np.concatenate([case.label.ravel() for case in cases])
    expected = {name: round(float((labels == value).mean()), 6) for value, name in train[0].label_names.items()}
    assert result.summary["label_fraction_train"] == expected
    assert result.summary["intensity_train"]["low"] == float(np.median([case.intensity.low for case in cases]))
    assert result.summary["splits"]["train"]["cases"] == len(train)

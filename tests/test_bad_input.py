"""One test per bad-input case: exit code 2, one line naming the file and the problem, nothing written."""

import gzip
import shutil

import nibabel as nib
import numpy as np
import pytest

from radsynth.flows.cli import main
from radsynth.pipelines.data.io import write_nifti

from .conftest import REPO, write_image_folder, write_msd_folder


def run_ingest(capsys, preset: str, *overrides: str) -> str:
    """Run ``radsynth ingest``; assert exit 2 and a one-line message; return it."""
    code = main(["ingest", str(REPO / "configs" / f"{preset}.yaml"), *overrides])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2, lines
    # Progress bars may precede it; the error itself is one line, the last, and the only one.
    errors = [line for line in lines if "error" in line]
    assert errors == [lines[-1]] and lines[-1].startswith("radsynth: error:")
    return lines[-1]


@pytest.fixture
def msd(tmp_path):
    root = write_msd_folder(tmp_path / "msd", n_cases=4)
    run = tmp_path / "run"
    overrides = [f"data.root={root}", "data.label_names=null", "data.preprocess.target_shape=[16,16,16]",
                 f"runtime.output_dir={run}"]
    return root, run, overrides


@pytest.fixture
def folder(tmp_path):
    root = write_image_folder(tmp_path / "cxr", n_cases=6)
    run = tmp_path / "run"
    overrides = [f"data.root={root}", "data.preprocess.target_shape=[16,16]", f"runtime.output_dir={run}",
                 "data.image_folder.attribute_columns=[finding, sex, age]", "conditioning.attributes=[finding, sex]"]
    return root, run, overrides


def assert_nothing_written(run):
    assert not (run / "data" / "manifest.jsonl").exists()
    cached = list((run / "data" / "cache").rglob("*")) if (run / "data" / "cache").exists() else []
    assert [p for p in cached if p.is_file()] == [] and not any(".staging" in str(p) for p in cached)


def replace_case(root, name, image=None, label=None, affine=np.diag([1.5, 1.0, 2.0, 1.0]), label_affine=None):
    if image is not None:
        write_nifti(root / "imagesTr" / name, image, affine)
    if label is not None:
        write_nifti(root / "labelsTr" / name, label, affine if label_affine is None else label_affine)


def test_truncated_nifti(capsys, msd):
    root, run, overrides = msd
    path = root / "imagesTr" / "case_002.nii.gz"
    path.write_bytes(path.read_bytes()[:300])
    err = run_ingest(capsys, "hippocampus", *overrides)
    assert "case_002.nii.gz" in err and ("unreadable or truncated" in err or "unreadable NIfTI header" in err)
    assert_nothing_written(run)


def test_truncated_png(capsys, folder):
    root, run, overrides = folder
    path = root / "images" / "img003.png"
    path.write_bytes(path.read_bytes()[:120])
    err = run_ingest(capsys, "cxr", *overrides)
    assert "img003.png" in err and "unreadable" in err
    assert_nothing_written(run)


def test_image_label_shape_mismatch(capsys, msd):
    root, run, overrides = msd
    replace_case(root, "case_001.nii.gz", label=np.zeros((12, 14, 9), np.uint8))
    err = run_ingest(capsys, "hippocampus", *overrides)
    assert "labelsTr/case_001.nii.gz" in err and "label shape (12, 14, 9) differs from image shape (12, 14, 10)" in err
    assert_nothing_written(run)


def test_image_label_affine_mismatch(capsys, msd):
    root, run, overrides = msd
    label = np.asanyarray(nib.load(root / "labelsTr" / "case_001.nii.gz").dataobj)
    shifted = np.diag([1.5, 1.0, 2.0, 1.0])
    shifted[0, 3] = 4.0  # same grid, moved 4 mm
    replace_case(root, "case_001.nii.gz", label=label, label_affine=shifted)
    err = run_ingest(capsys, "hippocampus", *overrides)
    assert "case_001.nii.gz" in err and "label affine differs from image affine" in err
    assert_nothing_written(run)


def test_label_values_absent_from_the_label_map(capsys, msd):
    root, run, overrides = msd
    label = np.zeros((12, 14, 10), np.uint8)
    label[2:4, 2:4, 2:4] = 7
    replace_case(root, "case_003.nii.gz", label=label)
    err = run_ingest(capsys, "hippocampus", *overrides)
    assert "case_003.nii.gz" in err and "label values [7] are not in the label map" in err and "allowed: [0, 1, 2]" in err
    assert_nothing_written(run)


def test_non_integer_labels(capsys, msd):
    root, run, overrides = msd
    replace_case(root, "case_000.nii.gz", label=np.full((12, 14, 10), 0.5, np.float32))
    err = run_ingest(capsys, "hippocampus", *overrides)
    assert "labelsTr/case_000.nii.gz" in err and "non-integer" in err
    assert_nothing_written(run)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_voxels(capsys, msd, bad):
    root, run, overrides = msd
    image = np.random.default_rng(0).normal(size=(12, 14, 10)).astype(np.float32)
    image[3, 4, 5] = bad
    replace_case(root, "case_002.nii.gz", image=image)
    err = run_ingest(capsys, "hippocampus", *overrides)
    assert "imagesTr/case_002.nii.gz" in err and "1 NaN/Inf voxels" in err
    assert_nothing_written(run)


def test_empty_image(capsys, msd):
    root, run, overrides = msd
    replace_case(root, "case_001.nii.gz", image=np.zeros((12, 14, 10), np.float32))
    err = run_ingest(capsys, "hippocampus", *overrides)
    assert "imagesTr/case_001.nii.gz" in err and "empty image" in err
    assert_nothing_written(run)


def test_4d_where_3d_is_expected(capsys, msd):
    root, run, overrides = msd
    replace_case(root, "case_001.nii.gz", image=np.random.default_rng(0).random((12, 14, 10, 3)).astype(np.float32))
    err = run_ingest(capsys, "hippocampus", *overrides)
    assert "case_001.nii.gz" in err and "4D" in err
    assert_nothing_written(run)


def test_duplicate_case_ids(capsys, folder):
    root, run, overrides = folder
    csv = root / "manifest.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join([*lines, lines[2]]) + "\n")
    err = run_ingest(capsys, "cxr", *overrides, "data.image_folder.patient_column=patientid")
    assert "duplicate case ids: img001" in err
    assert_nothing_written(run)


def test_duplicate_case_ids_in_an_msd_folder(capsys, msd):
    root, run, overrides = msd
    source = root / "imagesTr" / "case_001.nii.gz"
    (root / "imagesTr" / "case_001.nii").write_bytes(gzip.decompress(source.read_bytes()))
    err = run_ingest(capsys, "hippocampus", *overrides)
    assert "case_001" in err and "duplicate case id" in err
    assert_nothing_written(run)


def test_missing_csv_columns(capsys, folder):
    root, run, overrides = folder
    err = run_ingest(capsys, "cxr", *overrides, "data.image_folder.attribute_columns=[finding, view]")
    assert "manifest.csv" in err and "missing CSV columns ['view']" in err and "columns present: id, patientid" in err
    assert_nothing_written(run)


def test_one_patient_in_two_splits(capsys, folder):
    root, run, overrides = folder
    csv = root / "manifest.csv"
    lines = csv.read_text().splitlines()
    splits = ["train", "test", "train", "train", "holdout", "holdout"]  # img000/img001 share patient p0
    csv.write_text("\n".join([lines[0] + ",split"] + [f"{line},{s}" for line, s in zip(lines[1:], splits)]) + "\n")
    err = run_ingest(capsys, "cxr", *overrides, "data.image_folder.split_column=split")
    assert "one patient is in splits ['test', 'train'] (cases img000, img001)" in err
    assert "p0" not in err  # patient identifiers never appear in messages
    assert_nothing_written(run)


def test_missing_image_for_a_csv_row(capsys, folder):
    root, run, overrides = folder
    (root / "images" / "img004.png").unlink()
    err = run_ingest(capsys, "cxr", *overrides)
    assert "manifest.csv:6" in err and "no image for id 'img004'" in err
    assert_nothing_written(run)


def test_missing_source_folder(capsys, tmp_path):
    err = run_ingest(capsys, "hippocampus", f"data.root={tmp_path / 'nowhere'}", f"runtime.output_dir={tmp_path}")
    assert "nowhere/imagesTr: folder not found" in err


def test_2d_data_with_a_3d_target_shape(capsys, folder):
    root, run, overrides = folder
    err = run_ingest(capsys, "cxr", *overrides, "data.preprocess.target_shape=[16,16,16]")
    assert "img000.png" in err and "image is 2D but data.preprocess.target_shape has 3 entries" in err
    assert_nothing_written(run)


def test_unknown_config_key(capsys, msd):
    _, run, overrides = msd
    err = run_ingest(capsys, "hippocampus", *overrides, "data.msd.image_dir=imgs")
    assert "hippocampus.yaml" in err and "unknown key 'data.msd.image_dir'; allowed here: images_dir, labels_dir" in err
    assert_nothing_written(run)


def test_unknown_config_value(capsys, msd):
    _, run, overrides = msd
    err = run_ingest(capsys, "hippocampus", *overrides, "data.preprocess.intensity.mode=zscore")
    assert "data.preprocess.intensity.mode" in err and "'zscore'" in err and "'ct_window', 'percentile'" in err
    assert_nothing_written(run)


def test_a_failed_ingest_leaves_the_previous_manifest_and_cache_untouched(capsys, msd):
    root, run, overrides = msd
    assert main(["ingest", str(REPO / "configs" / "hippocampus.yaml"), *overrides]) == 0
    capsys.readouterr()
    manifest = (run / "data" / "manifest.jsonl").read_bytes()
    cached = sorted(p.name for p in (run / "data" / "cache").rglob("*.safetensors"))
    write_msd_folder(root / "extra", n_cases=1)
    shutil.copy(root / "extra" / "imagesTr" / "case_000.nii.gz", root / "imagesTr" / "case_new.nii.gz")
    label = np.zeros((12, 14, 10), np.uint8)
    label[0, 0, 0] = 9
    write_nifti(root / "labelsTr" / "case_new.nii.gz", label, np.diag([1.5, 1.0, 2.0, 1.0]))
    err = run_ingest(capsys, "hippocampus", *overrides)
    assert "case_new.nii.gz" in err
    assert (run / "data" / "manifest.jsonl").read_bytes() == manifest
    assert sorted(p.name for p in (run / "data" / "cache").rglob("*.safetensors")) == cached
    assert not list((run / "data" / "cache").rglob(".staging*"))

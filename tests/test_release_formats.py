"""Release format writers against the tools that read those formats: nnU-Net's own integrity check, MONAI's
datalist loader and image reader, highdicom, and our own DICOM reader (which is tested against the standard's
geometry equations). Inputs are real sample folders written by ``write_sample``."""

from __future__ import annotations

import csv
import json
import sys
import warnings
from collections.abc import Collection
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image as PILImage
from pydicom.pixels import apply_modality_lut

from radsynth.configs.errors import UserInputError
from radsynth.pipelines.release.card import write_dataset_card
from radsynth.pipelines.release.formats import FORMAT_WRITERS, check_format_supports
from radsynth.pipelines.release.hub import hub_configs
from radsynth.pipelines.release.samples import DatasetInfo, ReleaseSample, read_sample_folder
from radsynth.pipelines.sampling.writers import PNG_MAX, SYNTHETIC_DESCRIPTION, write_sample

PROVENANCE = {"seed": 7, "scheduler": "ddim", "num_inference_steps": 10, "guidance_scale": 2.0, "model_hash": "abc123"}
PNG_RANGE = (-200.0, 1200.0)
XRAY_INFO = DatasetInfo("cxr", "xray", 2, {1: "lung", 2: "heart", 3: "effusion"}, ("finding", "view"), "finding")
CT_INFO = DatasetInfo("torso", "ct", 3, {1: "liver", 2: "lesion"}, ("finding",))
CT_AFFINE = np.array([[0.8, 0, 0, -10.0], [0, 0.7, 0, 20.0], [0, 0, 2.0, 30.0], [0, 0, 0, 1]])


@dataclass
class SampleSet:
    samples: list[ReleaseSample]
    info: DatasetInfo
    images: dict[str, np.ndarray]  # what write_sample was given, in physical units
    labels: dict[str, np.ndarray]


def _xray_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    label = np.zeros((32, 32), np.uint8)
    label[4:14, 3:13], label[18:26, 10:20], label[27:31, 2:30] = 1, 2, 3
    return rng.uniform(*PNG_RANGE, size=label.shape).astype(np.float32), label


def _ct_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    label = np.zeros((16, 16, 16), np.uint8)
    label[2:10, 3:12, 1:14] = 1
    label[5:8, 6:9, 4:7] = 2
    return rng.normal(40, 300, size=label.shape).astype(np.float32), label


def _write_set(folder: Path, info: DatasetInfo, ids: list[str], derived: Collection[str] = (), seed: int = 0) -> SampleSet:
    rng = np.random.default_rng(seed)
    images, labels = {}, {}
    for index, sample_id in enumerate(ids):
        findings = ("effusion", "normal") if info.modality == "xray" else ("lesion",)
        sidecar = {**PROVENANCE, "prompt": f"finding: {findings[index % len(findings)]}; view: PA. Film {index}.",
                   "derived_from_real": sample_id in derived}
        if info.spatial_dims == 2:
            image, label = _xray_pair(rng)
            write_sample(folder, sample_id, image, (0.5, 0.7), "png16", sidecar, png_range=PNG_RANGE, label=label)
        else:
            image, label = _ct_pair(rng)
            write_sample(folder, sample_id, image, CT_AFFINE, "nifti", sidecar, label=label)
        images[sample_id], labels[sample_id] = image, label
    return SampleSet(read_sample_folder(folder), info, images, labels)


def _as_real(sample_set: SampleSet, patients: list[str]) -> list[ReleaseSample]:
    # Real cases reach the nnU-Net writer as ReleaseSamples whose sidecar does not say is_synthetic.
    return [replace(sample, sidecar={**sample.sidecar, "is_synthetic": False, "patient_id": patient})
            for sample, patient in zip(sample_set.samples, patients)]


@pytest.fixture
def xray(tmp_path) -> SampleSet:
    return _write_set(tmp_path / "xray", XRAY_INFO, ["syn_000001", "000002", "syn_000003"], derived={"000002"})


@pytest.fixture
def ct(tmp_path) -> SampleSet:
    return _write_set(tmp_path / "ct", CT_INFO, ["000001", "000002"], derived={"000002"}, seed=1)


@pytest.fixture(params=["2d", "3d"])
def either(request, xray, ct) -> SampleSet:
    return xray if request.param == "2d" else ct


def _write(format_name: str, sample_set: SampleSet, out_dir: Path, **kwargs) -> list[Path]:
    out_dir.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # highdicom's notes on empty type 2 attributes
        paths = FORMAT_WRITERS[format_name](sample_set.samples, out_dir, sample_set.info, **kwargs)
    assert paths and all(path.is_file() and out_dir in path.parents for path in paths)
    return paths


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


# ------------------------------------------------------------------------------------------- nnU-Net


def test_nnunet_output_passes_nnunets_own_integrity_check(either, tmp_path):
    pytest.importorskip("nnunetv2")
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    folder = "xray_real" if either.info.spatial_dims == 2 else "ct_real"
    real_set = _write_set(tmp_path / folder, either.info, ["r1", "r2"], seed=5)
    out = tmp_path / "Dataset501_Synthetic"
    _write("nnunet", either, out, real=_as_real(real_set, ["p1", "p2"]))
    verify_dataset_integrity(str(out), num_processes=1)  # raises on missing files, bad labels, shape or spacing mismatch

    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["numTraining"] == len(either.samples) + 2
    expected_names = {"background": 0, **{name: value for value, name in either.info.label_names.items()}}
    assert dataset["labels"] == expected_names
    if either.info.modality == "ct":
        assert dataset["channel_names"] == {"0": "CT"} and dataset["file_ending"] == ".nii.gz"
    else:
        assert dataset["channel_names"] == {"0": "XRay"} and dataset["file_ending"] == ".png"


def test_nnunet_2d_png_reads_back_through_nnunets_reader_bit_for_bit(xray, tmp_path):
    pytest.importorskip("nnunetv2")
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    out = tmp_path / "Dataset502_Xray"
    _write("nnunet", xray, out)
    dataset = json.loads((out / "dataset.json").read_text())
    image_file = str(out / "imagesTr" / "syn_000001_0000.png")
    reader = determine_reader_writer_from_dataset_json(dataset, image_file, verbose=False)()
    images, _ = reader.read_images([image_file])
    segmentation, _ = reader.read_seg(str(out / "labelsTr" / "syn_000001.png"))
    source = np.asarray(PILImage.open(xray.samples[0].image_path.with_name("syn_000001.png")))  # the sample's own pixels
    assert np.array_equal(images[0, 0], source.astype(np.float32))
    assert np.array_equal(segmentation[0, 0], xray.labels["syn_000001"])


def test_nnunet_case_names_and_folds_validate_on_real_patients_only(ct, tmp_path):
    real_set = _write_set(tmp_path / "real", CT_INFO, [f"case{i}" for i in range(7)], seed=3)
    patients = ["p0", "p1", "p2", "p3", "p4", "p5", "p0"]  # case0 and case6 are one patient
    out = tmp_path / "nnunet"
    _write("nnunet", ct, out, real=_as_real(real_set, patients))

    cases = sorted(path.name[: -len("_0000.nii.gz")] for path in (out / "imagesTr").iterdir())
    synthetic = ["syn_000001", "syn_000002"]
    real = [f"real_case{i}" for i in range(7)]
    assert cases == sorted(synthetic + real)
    folds = json.loads((out / "splits_final.json").read_text())
    assert len(folds) == 5
    for fold in folds:
        assert fold["val"] and all(case.startswith("real_") for case in fold["val"])
        assert set(synthetic) <= set(fold["train"])
        assert set(fold["train"]) | set(fold["val"]) == set(cases) and not set(fold["train"]) & set(fold["val"])
    validated = sorted(case for fold in folds for case in fold["val"])
    assert validated == sorted(real)  # each real case validated exactly once
    assert any({"real_case0", "real_case6"} <= set(fold["val"]) for fold in folds)  # a patient stays in one fold


def test_nnunet_ids_already_prefixed_are_not_prefixed_twice_and_no_splits_without_real(xray, tmp_path):
    out = tmp_path / "nnunet"
    _write("nnunet", xray, out)
    assert sorted(path.name for path in (out / "labelsTr").iterdir()) == [
        "syn_000001.png", "syn_000002.png", "syn_000003.png"]
    assert not (out / "splits_final.json").exists()


def test_nnunet_nifti_labels_are_integers_on_the_image_grid_and_synthetic_images_say_so(ct, tmp_path):
    real = _as_real(_write_set(tmp_path / "real", CT_INFO, ["case0"], seed=4), ["p0"])
    out = tmp_path / "nnunet"
    _write("nnunet", ct, out, real=real)
    for sample_id, original in ct.images.items():
        image = nib.load(out / "imagesTr" / f"syn_{sample_id}_0000.nii.gz")
        label = nib.load(out / "labelsTr" / f"syn_{sample_id}.nii.gz")
        assert image.get_data_dtype() == np.float32
        np.testing.assert_allclose(np.asanyarray(image.dataobj), original)  # HU kept, not rescaled
        assert np.issubdtype(label.get_data_dtype(), np.integer)
        assert label.shape == image.shape and np.array_equal(label.affine, image.affine)
        np.testing.assert_allclose(image.affine, CT_AFFINE)
        assert np.array_equal(np.asanyarray(label.dataobj), ct.labels[sample_id])
        for nifti in (image, label):
            assert nifti.header["descrip"].tobytes().rstrip(b"\0").decode() == SYNTHETIC_DESCRIPTION
    real_image = nib.load(out / "imagesTr" / "real_case0_0000.nii.gz")
    assert SYNTHETIC_DESCRIPTION.encode() not in real_image.header["descrip"].tobytes()


# ------------------------------------------------------------------------------------------- MONAI / MSD


@pytest.mark.parametrize("format_name, datalist", [("monai", "datalist.json"), ("msd", "dataset.json")])
def test_monai_loads_the_datalist_and_each_image_with_its_label(either, tmp_path, format_name, datalist):
    from monai.data import load_decathlon_datalist
    from monai.transforms import LoadImage

    out = tmp_path / format_name
    _write(format_name, either, out)
    entries = load_decathlon_datalist(str(out / datalist), is_segmentation=True, data_list_key="training")
    assert len(entries) == len(either.samples)
    load = LoadImage(image_only=True)
    for entry, sample in zip(entries, either.samples):
        assert entry["is_synthetic"] is True and entry["derived_from_real"] is sample.derived_from_real
        image, label = load(entry["image"]), load(entry["label"])
        assert image.shape == label.shape
        np.testing.assert_allclose(np.asarray(image.affine), np.asarray(label.affine))
        assert set(np.unique(np.asarray(label)).astype(int)) == set(np.unique(either.labels[sample.sample_id]))
        if either.info.spatial_dims == 3:  # NIfTI keeps HU
            np.testing.assert_allclose(np.asarray(image), either.images[sample.sample_id], rtol=1e-6)


def test_monai_2d_xray_entries_map_png_back_to_physical_units(xray, tmp_path):
    from monai.data import load_decathlon_datalist
    from monai.transforms import LoadImage

    out = tmp_path / "monai"
    _write("monai", xray, out)
    entries = load_decathlon_datalist(str(out / "datalist.json"), is_segmentation=True)
    for entry in entries:
        pixels = np.asarray(LoadImage(image_only=True)(entry["image"])).T  # PIL reader returns (column, row)
        physical = entry["png_low"] + pixels / PNG_MAX * (entry["png_high"] - entry["png_low"])
        step = (PNG_RANGE[1] - PNG_RANGE[0]) / PNG_MAX
        np.testing.assert_allclose(physical, xray.images[entry["sample_id"]], atol=step / 2 + 1e-3)
        assert entry["finding"] in ("effusion", "normal") and entry["view"] == "PA"
        assert entry["pixel_spacing_mm"] == "0.5 0.7"


# ------------------------------------------------------------------------------------------- PNG, ImageFolder


def test_png16_round_trips_to_physical_units_with_integer_masks(xray, tmp_path):
    out = tmp_path / "png16"
    _write("png16", xray, out)
    rows = _read_csv(out / "metadata.csv")
    assert sorted(row["sample_id"] for row in rows) == sorted(xray.images)
    step = (PNG_RANGE[1] - PNG_RANGE[0]) / PNG_MAX
    for row in rows:
        pixels = np.asarray(PILImage.open(out / row["file_name"]))
        assert pixels.dtype == np.uint16
        low, high = float(row["png_low"]), float(row["png_high"])
        physical = low + pixels / PNG_MAX * (high - low)
        np.testing.assert_allclose(physical, xray.images[row["sample_id"]], atol=step / 2 + 1e-3)
        mask = np.asarray(PILImage.open(out / row["mask_file_name"]))
        assert mask.dtype == np.uint8 and np.array_equal(mask, xray.labels[row["sample_id"]])
    assert json.loads((out / "labels.json").read_text()) == {"0": "background", "1": "lung", "2": "heart", "3": "effusion"}


def test_imagefolder_sorts_samples_into_class_folders(xray, tmp_path):
    out = tmp_path / "imagefolder"
    _write("imagefolder", xray, out)
    rows = _read_csv(out / "metadata.csv")
    assert list(rows[0])[:2] == ["file_name", "label"]
    assert {"sample_id", "is_synthetic", "prompt", "finding", "view"} <= set(rows[0])
    for row in rows:  # label: the class's index in torchvision's (sorted) order
        path = out / row["file_name"]
        assert path.is_file() and path.parent.name == row["finding"] == ["effusion", "normal"][int(row["label"])]
    assert sorted(path.parent.name for path in out.rglob("*.png")) == ["effusion", "effusion", "normal"]


def test_a_release_loads_in_hugging_face_datasets_each_sample_once_with_its_label_map_and_class(xray, tmp_path):
    """``load_dataset(<release>)`` reads the card's default config (the PNG table with label maps), not every PNG of
    every format; the image folder config gives the class as a ClassLabel."""
    datasets = pytest.importorskip("datasets")
    release = tmp_path / "release"
    release.mkdir()
    for format_name in ("png16", "imagefolder", "monai"):
        _write(format_name, xray, release / format_name)
    write_dataset_card(release, {"dataset": {"name": "cxr", "modality": "xray", "spatial_dims": 2, "n_samples": 3,
                                             "class_attribute": "finding", "formats": ["png16", "imagefolder", "monai"],
                                             "label_names": {"1": "lung", "2": "heart", "3": "effusion"}}})
    ids = sorted(sample.sample_id for sample in xray.samples)
    pairs = datasets.load_dataset(str(release), cache_dir=str(tmp_path / "hf"))["train"]
    assert sorted(pairs["sample_id"]) == ids and pairs.num_rows == 3
    assert isinstance(pairs.features["image"], datasets.Image) and isinstance(pairs.features["mask"], datasets.Image)
    assert pairs.features["is_synthetic"].dtype == "bool" and all(pairs["is_synthetic"])
    for row in pairs:
        assert np.array_equal(np.asarray(row["mask"]), xray.labels[row["sample_id"]])
    classes = datasets.load_dataset(str(release), "imagefolder", cache_dir=str(tmp_path / "hf"))["train"]
    assert sorted(classes["sample_id"]) == ids
    label = classes.features["label"]
    assert isinstance(label, datasets.ClassLabel) and label.names == ["effusion", "normal"]
    assert [label.int2str(row["label"]) for row in classes] == classes["finding"]


def test_without_label_maps_the_image_folder_is_the_default_hub_config(xray, tmp_path):
    text_only = replace(xray, samples=[replace(sample, label_path=None) for sample in xray.samples],
                        info=replace(xray.info, label_names={}))
    release = tmp_path / "release"
    release.mkdir()
    for format_name in ("png16", "imagefolder"):
        _write(format_name, text_only, release / format_name)
    configs = hub_configs(release, "finding")
    assert [(config["config_name"], config.get("default", False)) for config in configs] == [
        ("imagefolder", True), ("png16", False)]
    assert hub_configs(release, "finding") == configs and hub_configs(tmp_path / "empty", "finding") == []


@pytest.mark.parametrize("format_name, table", [("monai", "datalist.json"), ("imagefolder", "metadata.csv"),
                                                ("png16", "metadata.csv"), ("msd", "dataset.json")])
def test_every_table_marks_synthetic_and_derived_from_real_samples(xray, tmp_path, format_name, table):
    out = tmp_path / format_name
    _write(format_name, xray, out)
    if table.endswith(".csv"):
        rows = [(row["is_synthetic"], row["derived_from_real"]) for row in _read_csv(out / table)]
        assert rows == [("True", "True"), ("True", "False"), ("True", "False")]  # 000002 sorts first
    else:
        entries = json.loads((out / table).read_text())["training"]
        assert [(entry["is_synthetic"], entry["derived_from_real"]) for entry in entries] == [
            (True, True), (True, False), (True, False)]


# ------------------------------------------------------------------------------------------- DICOM


def _dicom_files(folder: Path) -> list:
    import pydicom

    return [pydicom.dcmread(path) for path in sorted(folder.rglob("*.dcm"))]


def _assert_marked_and_anonymous(datasets: list, sample_ids: set[str]) -> None:
    for dataset in datasets:
        assert dataset.SyntheticData == "YES"
        assert str(dataset.PatientID) in sample_ids and str(dataset.PatientName).rstrip("^") == dataset.PatientID
        assert not dataset.get("PatientBirthDate") and not dataset.get("PatientSex")
        if dataset.Modality != "SEG":
            assert list(dataset.ImageType)[:2] == ["DERIVED", "SECONDARY"]


def test_dicom_ct_series_and_seg_read_back_through_our_dicom_reader(ct, tmp_path):
    pytest.importorskip("highdicom")
    from radsynth.configs.schema import DataConfig
    from radsynth.pipelines.data.adapters.dicom import read_dicom

    out = tmp_path / "dicom"
    _write("dicom", ct, out)
    datasets = _dicom_files(out)
    _assert_marked_and_anonymous(datasets, set(ct.images))
    images = [dataset for dataset in datasets if dataset.Modality == "CT"]
    assert {dataset.SOPClassUID.name for dataset in images} == {"CT Image Storage"}
    assert len(images) == 16 * len(ct.samples)

    data = DataConfig(name="roundtrip", format="dicom", root=str(out), preprocess={"target_shape": [16, 16, 16]})
    records = read_dicom(data, tmp_path / "work")
    assert len(records) == len(ct.samples)
    for record in records:
        image, label = nib.load(record.image), nib.load(record.label)
        array = np.asanyarray(image.dataobj)
        sample_id = min(ct.images, key=lambda key: np.abs(ct.images[key] - array).max())
        slope = float(np.ptp(ct.images[sample_id])) / PNG_MAX
        np.testing.assert_allclose(array, ct.images[sample_id], atol=slope / 2 + 1e-3)  # HU back via rescale
        np.testing.assert_allclose(image.affine, CT_AFFINE, atol=1e-5)
        assert np.array_equal(np.asanyarray(label.dataobj), ct.labels[sample_id])
        assert record.label_names == {0: "background", 1: "liver", 2: "lesion"}


def test_dicom_xray_is_a_synthetic_secondary_capture_with_a_matching_seg(xray, tmp_path):
    highdicom = pytest.importorskip("highdicom")

    out = tmp_path / "dicom"
    _write("dicom", xray, out)
    _assert_marked_and_anonymous(_dicom_files(out), set(xray.images))
    for sample_id, label in xray.labels.items():
        image = _dicom_files(out / sample_id)[0]  # image_0001.dcm sorts before seg.dcm
        assert image.SOPClassUID.name == "Secondary Capture Image Storage" and image.ConversionType == "SYN"
        seg = highdicom.seg.segread(out / sample_id / "seg.dcm")
        assert seg.number_of_segments == 3
        assert [seg.get_segment_description(n).segment_label for n in (1, 2, 3)] == ["lung", "heart", "effusion"]
        mask = seg.get_pixels_by_source_instance([image.SOPInstanceUID], combine_segments=True)
        assert np.array_equal(mask[0], label)
        # The PNG sample's 16-bit values and mapping are kept as they are: physical units come back exactly.
        png_sample = next(sample for sample in xray.samples if sample.sample_id == sample_id)
        physical = apply_modality_lut(image.pixel_array, image)
        np.testing.assert_allclose(physical, png_sample.read_image().array, atol=1e-3)


# ------------------------------------------------------------------------------------------- checks


def _without_label(sample: ReleaseSample) -> ReleaseSample:
    return replace(sample, label_path=None)


@pytest.mark.parametrize("format_name, change, problem", [
    ("nnunet", lambda s, i: ([_without_label(s[0]), *s[1:]], i), "needs a label map for every sample"),
    ("msd", lambda s, i: ([_without_label(x) for x in s], i), "3 have none"),
    ("nnunet", lambda s, i: (s, replace(i, label_names={1: "lung", 3: "effusion"})), "consecutive label values"),
    ("nnunet", lambda s, i: (s, replace(i, label_names={1: "lung", 2: "lung"})), "one name per label value"),
    ("png16", lambda s, i: (s, replace(i, spatial_dims=3)), "png16 holds 2D images"),
    ("imagefolder", lambda s, i: (s, replace(i, class_attribute=None)), "needs a class attribute"),
    ("imagefolder", lambda s, i: (s, replace(i, class_attribute="sex")), "not prompted with"),
    ("dicom", lambda s, i: (s, replace(i, spatial_dims=3)), "3D X-ray"),
    ("parquet", lambda s, i: (s, i), "unknown format 'parquet'"),
])
def test_check_format_supports_refuses_impossible_combinations(xray, format_name, change, problem):
    check_format_supports(format_name if format_name != "parquet" else "monai", xray.samples, xray.info)  # fine as is
    samples, info = change(xray.samples, xray.info)
    with pytest.raises(UserInputError, match=problem) as raised:
        check_format_supports(format_name, samples, info)
    assert raised.value.where == "release.formats"


def test_check_format_supports_refuses_dicom_without_highdicom(xray, monkeypatch):
    check_format_supports("dicom", xray.samples, xray.info)
    monkeypatch.setitem(sys.modules, "highdicom", None)  # what an environment without the extra looks like
    with pytest.raises(UserInputError, match="dicom needs highdicom"):
        check_format_supports("dicom", xray.samples, xray.info)


def test_check_format_supports_refuses_class_values_that_share_a_folder(tmp_path):
    sample_set = _write_set(tmp_path / "s", XRAY_INFO, ["a1", "a2"])
    samples = [replace(sample, sidecar={**sample.sidecar, "prompt": f"finding: {value}. x"})
               for sample, value in zip(sample_set.samples, ["pleural effusion", "pleural_effusion"])]
    with pytest.raises(UserInputError, match="would share one folder name"):
        check_format_supports("imagefolder", samples, XRAY_INFO)

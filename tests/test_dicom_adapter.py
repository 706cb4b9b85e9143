"""The DICOM adapter against series built here, from known volumes with known geometry.

Expected values come from the DICOM standard's own equation (PS3.3 C.7.6.2.1.1): the pixel at row r, column
c of a slice lies at ImagePositionPatient + c * PixelSpacing[1] * row_cosine + r * PixelSpacing[0] *
column_cosine, in LPS. Every check maps the converted NIfTI's voxels through its affine and back through that
equation, so it does not share the adapter's reasoning about axes.
"""

from __future__ import annotations

import json
import logging
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image as PILImage
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEGLossless,
    generate_uid,
)

from radsynth.configs.errors import UserInputError
from radsynth.configs.schema import DataConfig
from radsynth.pipelines.data.adapters import read_source
from radsynth.pipelines.data.adapters.dicom import age_in_years, pseudonymous_patient_id, read_dicom
from radsynth.pipelines.data.adapters.dicom import geometry as dicom_geometry
from radsynth.pipelines.data.manifest import read_manifest, write_manifest

RAW_PATIENT_ID = "MRN-0042-SECRET"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


# ------------------------------------------------------------------------------------------- builders


@dataclass
class Geometry:
    """Where a stack sits in the patient (LPS): the quantities a DICOM writer puts in each slice."""

    origin: tuple[float, float, float] = (-40.0, 25.0, 100.0)
    row_cosine: tuple[float, float, float] = (1.0, 0.0, 0.0)
    column_cosine: tuple[float, float, float] = (0.0, 1.0, 0.0)
    pixel_spacing: tuple[float, float] = (0.8, 0.6)  # (between rows, between columns)
    slice_spacing: float = 2.5

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_cosine, self.column_cosine)

    def slice_position(self, k: int) -> np.ndarray:
        return np.asarray(self.origin) + k * self.slice_spacing * self.normal

    def lps_of(self, k: float, r: float, c: float) -> np.ndarray:
        """The standard's pixel-position equation."""
        return (
            self.slice_position(0)
            + k * self.slice_spacing * self.normal
            + c * self.pixel_spacing[1] * np.asarray(self.row_cosine)
            + r * self.pixel_spacing[0] * np.asarray(self.column_cosine)
        )

    def index_of(self, lps: np.ndarray) -> np.ndarray:
        """(k, r, c) of LPS points, shape (..., 3): the inverse of ``lps_of``."""
        basis = np.stack(
            [
                self.slice_spacing * self.normal,
                self.pixel_spacing[0] * np.asarray(self.column_cosine),
                self.pixel_spacing[1] * np.asarray(self.row_cosine),
            ],
            axis=1,
        )
        return (np.asarray(lps) - self.slice_position(0)) @ np.linalg.inv(basis).T


def rotation(z_deg: float, y_deg: float, x_deg: float) -> np.ndarray:
    z, y, x = np.deg2rad([z_deg, y_deg, x_deg])
    rz = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rx = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
    return rz @ ry @ rx


def oblique_geometry() -> Geometry:
    turn = rotation(25.0, 15.0, -10.0)
    return Geometry(
        origin=(12.5, -30.0, 55.0),
        row_cosine=tuple(turn[:, 0]),
        column_cosine=tuple(turn[:, 1]),
        pixel_spacing=(0.7, 0.9),
        slice_spacing=2.0,
    )


@dataclass
class SeriesSpec:
    volume_hu: np.ndarray  # [slice, row, column]
    geometry: Geometry = field(default_factory=Geometry)
    series_uid: str = field(default_factory=generate_uid)
    patient_id: str = RAW_PATIENT_ID
    modality: str = "CT"
    slope: float = 1.0
    intercept: float = -1024.0
    extra: dict = field(default_factory=dict)


def new_dataset(sop_class: str) -> Dataset:
    """An empty Part 10 dataset of one SOP class, with its file meta."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    return ds


def ct_dataset(spec: SeriesSpec, k: int, study_uid: str, frame_uid: str) -> Dataset:
    image = spec.volume_hu[k]
    ds = new_dataset(CTImageStorage)
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = spec.series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.Modality = spec.modality
    ds.PatientID = spec.patient_id
    ds.PatientName = "Doe^Jane"
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "F"
    ds.PatientAge = "064Y"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", "A1"
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
    ds.SeriesDescription = "CHEST W CONTRAST"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = spec.geometry.slice_spacing
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [float(v) for v in spec.geometry.slice_position(k)]
    ds.ImageOrientationPatient = [float(v) for v in (*spec.geometry.row_cosine, *spec.geometry.column_cosine)]
    ds.PixelSpacing = list(spec.geometry.pixel_spacing)
    ds.Rows, ds.Columns = image.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = spec.slope, spec.intercept
    stored = np.rint((image - spec.intercept) / spec.slope).astype(np.int16)
    ds.PixelData = stored.tobytes()
    for keyword, value in spec.extra.items():
        setattr(ds, keyword, value)
    return ds


def write_series(folder: Path, spec: SeriesSpec, names: list[str] | None = None) -> list[Dataset]:
    """Write one file per slice (names default to slice order) and return the datasets in slice order."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, frame_uid = generate_uid(), generate_uid()
    datasets = [ct_dataset(spec, k, study_uid, frame_uid) for k in range(len(spec.volume_hu))]
    names = names or [f"{spec.series_uid[-6:]}_{k:03d}.dcm" for k in range(len(datasets))]
    for dataset, name in zip(datasets, names):
        dataset.save_as(folder / name, enforce_file_format=True)
    return datasets


def ramp_volume(slices: int = 6, rows: int = 9, columns: int = 7, seed: int = 0) -> np.ndarray:
    """Distinct HU per voxel, so any axis mix-up or flip changes the values found at a position."""
    rng = np.random.default_rng(seed)
    return rng.integers(-1000, 1500, size=(slices, rows, columns)).astype(np.float32)


def data_config(root: Path, **kwargs) -> DataConfig:
    return DataConfig(name="t", format="dicom", root=str(root), preprocess={"target_shape": [32, 32, 32]}, **kwargs)


def assert_matches_geometry(image_path: str, spec: SeriesSpec) -> None:
    """Every converted voxel holds the HU value that the source series has at that world position."""
    image = nib.load(image_path)
    array = np.asarray(image.dataobj)
    indices = np.stack(np.meshgrid(*[np.arange(n) for n in array.shape], indexing="ij"), axis=-1).reshape(-1, 3)
    ras = indices @ image.affine[:3, :3].T + image.affine[:3, 3]
    source = spec.geometry.index_of(ras @ LPS_TO_RAS)  # RAS -> LPS is the same sign flip
    np.testing.assert_allclose(source, np.rint(source), atol=1e-4)
    k, r, c = np.rint(source).astype(int).T
    np.testing.assert_array_equal(array.reshape(-1), spec.volume_hu[k, r, c])


# ------------------------------------------------------------------------------------------- geometry


def test_axial_round_trip_recovers_hu_and_the_ras_layout(tmp_path):
    even_hu = ramp_volume() // 2 * 2  # representable with slope 2
    spec = SeriesSpec(even_hu, slope=2.0, intercept=-1000.0)
    write_series(tmp_path / "in", spec)
    (record,) = read_dicom(data_config(tmp_path / "in"), tmp_path / "work")

    image = nib.load(record.image)
    assert image.get_data_dtype() == np.float32
    # Axial LPS: columns run to the patient's left, rows posterior. Canonical RAS flips both, keeps slices.
    slices, rows, columns = spec.volume_hu.shape
    assert image.shape == (columns, rows, slices)
    expected = spec.volume_hu.transpose(2, 1, 0)[::-1, ::-1, :]
    np.testing.assert_array_equal(np.asarray(image.dataobj), expected)
    assert record.shape == (columns, rows, slices)
    assert record.spacing == pytest.approx((0.6, 0.8, 2.5))
    assert_matches_geometry(record.image, spec)


def test_oblique_bright_voxel_lands_at_its_world_position(tmp_path):
    volume = np.full((7, 11, 8), -500.0, dtype=np.float32)
    k, r, c = 4, 2, 6  # deliberately not symmetric in any axis
    volume[k, r, c] = 3000.0
    spec = SeriesSpec(volume, oblique_geometry())
    write_series(tmp_path / "in", spec)
    (record,) = read_dicom(data_config(tmp_path / "in"), tmp_path / "work")

    image = nib.load(record.image)
    array = np.asarray(image.dataobj)
    brightest = np.unravel_index(np.argmax(array), array.shape)
    x, y, z = spec.geometry.lps_of(k, r, c)
    np.testing.assert_allclose(image.affine @ [*brightest, 1.0], [-x, -y, z, 1.0], atol=1e-4)
    assert array.max() == 3000.0
    assert_matches_geometry(record.image, spec)
    assert sorted(record.spacing) == pytest.approx(sorted((0.7, 0.9, 2.0)))


def test_coronal_stack_with_reversed_axes_is_reordered_to_ras(tmp_path):
    # Rows run inferior and slices step posterior: every axis needs a permutation or flip to reach RAS.
    geometry = Geometry(row_cosine=(1.0, 0.0, 0.0), column_cosine=(0.0, 0.0, -1.0), pixel_spacing=(1.1, 0.5))
    spec = SeriesSpec(ramp_volume(5, 6, 8), geometry)
    write_series(tmp_path / "in", spec)
    (record,) = read_dicom(data_config(tmp_path / "in"), tmp_path / "work")

    affine = nib.load(record.image).affine
    assert np.all(np.diag(affine)[:3] > 0), "canonical RAS: every axis increases towards R, A, S"
    assert record.shape == (8, 5, 6)  # (columns -> R, slices -> A, rows -> S)
    assert record.spacing == pytest.approx((0.5, 2.5, 1.1))
    assert_matches_geometry(record.image, spec)


def test_slices_shuffled_on_disk_come_out_in_order(tmp_path):
    spec = SeriesSpec(ramp_volume(slices=8))
    names = [f"IM{n:04d}" for n in range(8)]  # no extension, as scanners write them
    random.Random(3).shuffle(names)
    write_series(tmp_path / "in", spec, names=names)
    (record,) = read_dicom(data_config(tmp_path / "in"), tmp_path / "work")
    assert_matches_geometry(record.image, spec)


# ------------------------------------------------------------------------------------------- structure


def test_missing_slice_is_a_spacing_error(tmp_path):
    write_series(tmp_path / "in", SeriesSpec(ramp_volume(slices=6)))
    sorted(tmp_path.joinpath("in").iterdir())[3].unlink()
    with pytest.raises(UserInputError, match="spacing"):
        read_dicom(data_config(tmp_path / "in"), tmp_path / "work")


def test_mixed_image_sizes_are_an_error(tmp_path):
    spec = SeriesSpec(ramp_volume(slices=4, rows=8, columns=8))
    datasets = write_series(tmp_path / "in", spec)
    odd = datasets[2]
    odd.Rows, odd.Columns = 6, 8
    odd.PixelData = np.zeros((6, 8), np.int16).tobytes()
    odd.save_as(tmp_path / "in" / "odd.dcm", enforce_file_format=True)
    next(p for p in (tmp_path / "in").iterdir() if p.name.endswith("_002.dcm")).unlink()
    with pytest.raises(UserInputError, match="different sizes"):
        read_dicom(data_config(tmp_path / "in"), tmp_path / "work")


def test_one_slice_series_is_an_error(tmp_path):
    write_series(tmp_path / "in", SeriesSpec(ramp_volume(slices=1)))
    with pytest.raises(UserInputError, match="1 slice"):
        read_dicom(data_config(tmp_path / "in"), tmp_path / "work")


def test_two_series_in_one_folder_become_two_cases(tmp_path):
    axial = SeriesSpec(ramp_volume(slices=6, seed=1))
    oblique = SeriesSpec(ramp_volume(slices=4, seed=2), oblique_geometry())
    write_series(tmp_path / "in", axial)
    write_series(tmp_path / "in", oblique)
    records = read_dicom(data_config(tmp_path / "in"), tmp_path / "work")

    assert len(records) == 2 and records[0].case_id != records[1].case_id
    for record in records:
        # The axial case is (columns, rows, slices) = (7, 9, 6); the oblique one is permuted.
        assert_matches_geometry(record.image, axial if record.shape == (7, 9, 6) else oblique)
    assert records[0].patient_id == records[1].patient_id, "same PatientID, same pseudonym"


def test_no_dicom_under_root_is_an_error(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    with pytest.raises(UserInputError, match="no usable DICOM image series"):
        read_dicom(data_config(tmp_path / "in"), tmp_path / "work")


def test_unsupported_modalities_are_skipped_and_counted(tmp_path, caplog):
    write_series(tmp_path / "in", SeriesSpec(ramp_volume(seed=1)))
    write_series(tmp_path / "in", SeriesSpec(ramp_volume(seed=2), modality="PT"))
    with caplog.at_level(logging.WARNING):
        records = read_dicom(data_config(tmp_path / "in"), tmp_path / "work")
    assert [r.modality for r in records] == ["ct"]
    assert "unsupported modality PT" in caplog.text


def test_localizers_and_4d_series_are_skipped_not_fatal(tmp_path, caplog):
    # Real study folders hold scouts and multi-echo series next to the volumes wanted.
    write_series(tmp_path / "in" / "volume", SeriesSpec(ramp_volume(seed=1)))
    scout = SeriesSpec(ramp_volume(slices=2), extra={"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]})
    write_series(tmp_path / "in" / "scout", scout)
    echo = SeriesSpec(ramp_volume(slices=3, seed=2))
    first_echo = write_series(tmp_path / "in" / "echoes", echo)
    for k, dataset in enumerate(first_echo):  # a second echo: same series, same positions, new instances
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        dataset.save_as(tmp_path / "in" / "echoes" / f"echo2_{k}.dcm", enforce_file_format=True)
    with caplog.at_level(logging.WARNING):
        records = read_dicom(data_config(tmp_path / "in"), tmp_path / "work")
    assert len(records) == 1 and records[0].shape == (7, 9, 6)
    assert "localizer" in caplog.text and "several images per slice position" in caplog.text


def test_garbage_after_dicom_preamble_is_named(tmp_path):
    write_series(tmp_path / "in", SeriesSpec(ramp_volume()))
    broken = tmp_path / "in" / "broken.dcm"
    broken.write_bytes(b"\0" * 128 + b"DICM" + b"this is not a data set" * 10)
    (tmp_path / "in" / "README").write_text("plain files are skipped silently")
    with pytest.raises(UserInputError, match="broken.dcm") as raised:
        read_dicom(data_config(tmp_path / "in"), tmp_path / "work")
    assert "unreadable or truncated" in str(raised.value)


def test_truncated_slice_is_named(tmp_path):
    write_series(tmp_path / "in", SeriesSpec(ramp_volume()))
    victim = sorted((tmp_path / "in").iterdir())[2]
    victim.write_bytes(victim.read_bytes()[:-20])  # cut inside the pixel data: the header still reads
    with pytest.raises(UserInputError, match=victim.name) as raised:
        read_dicom(data_config(tmp_path / "in"), tmp_path / "work")
    assert "truncated" in str(raised.value)


def test_compressed_pixels_without_a_decoder_name_the_package(tmp_path):
    if pydicom.pixels.get_decoder(JPEGLossless).is_available:
        pytest.skip("a JPEG Lossless decoder is installed here")
    datasets = write_series(tmp_path / "in", SeriesSpec(ramp_volume(slices=3)))
    first = datasets[0]
    first.file_meta.TransferSyntaxUID = JPEGLossless
    first.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8 not really jpeg \xff\xd9"])
    first["PixelData"].VR = "OB"
    path = sorted((tmp_path / "in").iterdir())[0]
    first.save_as(path, enforce_file_format=True)
    with pytest.raises(UserInputError, match="pylibjpeg"):
        read_dicom(data_config(tmp_path / "in"), tmp_path / "work")


# ------------------------------------------------------------------------------------------- identity


def test_patient_identifiers_never_leave_the_source(tmp_path, caplog):
    # A malformed UID, which the adapter reads: pydicom's own validation warning would quote it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # writing it warns too; only reading is under test
        write_series(tmp_path / "in", SeriesSpec(ramp_volume(), series_uid="1.2.840.UID-SECRET.7"))
    write_series(tmp_path / "in", SeriesSpec(ramp_volume(seed=4), patient_id="OTHER-77"))
    caplog.clear()  # pydicom warned while this test wrote the files; only reading them counts
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = read_dicom(data_config(tmp_path / "in"), tmp_path / "work")
    manifest = write_manifest(records, tmp_path / "work" / "manifest.jsonl")
    assert pydicom.config.settings.reading_validation_mode == pydicom.config.WARN, "global setting restored"

    texts = [manifest.read_text(), caplog.text, *(str(w.message) for w in caught)]
    texts += [p.read_text() for p in (tmp_path / "work").rglob("*.json")]
    names = [p.name for p in (tmp_path / "work").rglob("*")]
    for secret in (RAW_PATIENT_ID, "Doe^Jane", "OTHER-77", "UID-SECRET"):
        assert all(secret not in text for text in texts)
        assert all(secret not in name for name in names)
    assert all(r.patient_id.startswith("pat_") and r.case_id.startswith("dcm_") for r in records)
    assert len({r.patient_id for r in records}) == 2
    assert [r.case_id for r in read_manifest(manifest)] == [r.case_id for r in records]


def test_record_metadata(tmp_path):
    write_series(tmp_path / "in", SeriesSpec(ramp_volume(), extra={"PatientAge": "095Y"}))
    (record,) = read_dicom(data_config(tmp_path / "in", license="CC-BY-4.0"), tmp_path / "work")
    assert (record.modality, record.body_region, record.source, record.origin) == ("ct", "chest", "dicom", "real")
    assert record.text == "CHEST W CONTRAST" and record.license == "CC-BY-4.0" and record.split is None
    assert record.attributes == {"sex": "F", "age": 90, "slice_thickness": 2.5}
    assert record.label is None and record.label_names == {0: "background"}


@pytest.mark.parametrize(
    ("value", "years"), [("064Y", 64), ("089Y", 89), ("102Y", 90), ("018M", 1), ("010W", 0), ("", None), ("64", None)]
)
def test_age_parsing_caps_at_90(value, years):
    assert age_in_years(value) == years


def test_pseudonym_is_keyed_with_hmac_when_a_key_is_set(monkeypatch):
    header = Dataset()
    header.PatientID = RAW_PATIENT_ID
    header.SeriesInstanceUID = generate_uid()
    monkeypatch.delenv("RADSYNTH_PSEUDONYM_KEY", raising=False)
    unkeyed = pseudonymous_patient_id("demo", header)
    monkeypatch.setenv("RADSYNTH_PSEUDONYM_KEY", "")  # empty counts as unset
    assert pseudonymous_patient_id("demo", header) == unkeyed

    monkeypatch.setenv("RADSYNTH_PSEUDONYM_KEY", "first secret")
    keyed = pseudonymous_patient_id("demo", header)
    assert keyed.startswith("pat_") and len(keyed) == len(unkeyed)
    assert keyed != unkeyed
    assert pseudonymous_patient_id("demo", header) == keyed, "stable for the same key"
    assert pseudonymous_patient_id("other", header) != keyed, "still per dataset"
    monkeypatch.setenv("RADSYNTH_PSEUDONYM_KEY", "second secret")
    assert pseudonymous_patient_id("demo", header) not in (keyed, unkeyed)


def test_unchanged_series_is_not_converted_again(tmp_path, monkeypatch):
    spec = SeriesSpec(ramp_volume())
    write_series(tmp_path / "in", spec)
    config = data_config(tmp_path / "in")
    (first,) = read_dicom(config, tmp_path / "work")
    first_volume = np.asarray(nib.load(first.image).dataobj)

    def must_not_read(path):
        raise AssertionError("converted again")

    with monkeypatch.context() as patch:
        patch.setattr(dicom_geometry, "read_slice_values", must_not_read)  # where volumes read their slices
        (again,) = read_dicom(config, tmp_path / "work")
    assert again == first

    # A changed source file changes the digest and forces a fresh conversion.
    path = sorted((tmp_path / "in").iterdir())[0]
    dataset = pydicom.dcmread(path)
    dataset.RescaleIntercept = -1000.0
    dataset.save_as(path, enforce_file_format=True)
    (changed,) = read_dicom(config, tmp_path / "work")
    assert changed.sha256 != first.sha256
    difference = np.asarray(nib.load(changed.image).dataobj) - first_volume
    assert np.all(difference[:, :, 0] == 24.0) and np.all(difference[:, :, 1:] == 0.0)  # only slice 0, +24 HU


# ------------------------------------------------------------------------------------------- labels


def native_ras_affine(geometry: Geometry) -> np.ndarray:
    """The un-reoriented grid [column, row, slice] as a DICOM-to-NIfTI converter (dcm2niix) writes it."""
    affine = np.eye(4)
    affine[:3, 0] = LPS_TO_RAS @ (geometry.pixel_spacing[1] * np.asarray(geometry.row_cosine))
    affine[:3, 1] = LPS_TO_RAS @ (geometry.pixel_spacing[0] * np.asarray(geometry.column_cosine))
    affine[:3, 2] = LPS_TO_RAS @ (geometry.slice_spacing * geometry.normal)
    affine[:3, 3] = LPS_TO_RAS @ geometry.slice_position(0)
    return affine


def test_nifti_label_is_attached_on_the_image_grid(tmp_path):
    spec = SeriesSpec(ramp_volume(), oblique_geometry())
    write_series(tmp_path / "in", spec)
    mask = (spec.volume_hu > 900).astype(np.uint8) + (spec.volume_hu < -900).astype(np.uint8) * 2
    labels = tmp_path / "labels"
    labels.mkdir()
    label_file = nib.Nifti1Image(mask.transpose(2, 1, 0), native_ras_affine(spec.geometry))
    nib.save(label_file, labels / f"{spec.series_uid}.nii.gz")

    (record,) = read_dicom(data_config(tmp_path / "in", dicom={"labels_dir": str(labels)}), tmp_path / "work")
    image, label = nib.load(record.image), nib.load(record.label)
    np.testing.assert_allclose(label.affine, image.affine, atol=1e-6)
    hu = np.asarray(image.dataobj)
    expected = (hu > 900).astype(np.uint8) + (hu < -900).astype(np.uint8) * 2
    np.testing.assert_array_equal(np.asarray(label.dataobj), expected)
    assert record.label_names == {0: "background", 1: "label_1", 2: "label_2"}
    assert record.label.endswith(f"{record.case_id}_label.nii.gz")


def test_label_config_names_override(tmp_path):
    spec = SeriesSpec(ramp_volume())
    write_series(tmp_path / "in", spec)
    labels = tmp_path / "labels"
    labels.mkdir()
    mask = (spec.volume_hu > 900).astype(np.uint8)
    label_file = nib.Nifti1Image(mask.transpose(2, 1, 0), native_ras_affine(spec.geometry))
    nib.save(label_file, labels / f"{spec.series_uid}.nii.gz")
    config = data_config(tmp_path / "in", dicom={"labels_dir": str(labels)}, label_names={0: "background", 1: "bone"})
    (record,) = read_source(config, tmp_path / "work")
    assert record.label_names == {0: "background", 1: "bone"}


@pytest.mark.parametrize("mismatch", ["shifted", "shape"])
def test_mismatched_nifti_label_is_an_error(tmp_path, mismatch):
    spec = SeriesSpec(ramp_volume())
    write_series(tmp_path / "in", spec)
    labels = tmp_path / "labels"
    labels.mkdir()
    affine = native_ras_affine(spec.geometry)
    mask = np.zeros(spec.volume_hu.shape[::-1], np.uint8)
    if mismatch == "shifted":
        affine[:3, 3] += [0.0, 2.0, 0.0]
    else:
        mask = mask[:, :, :-1]
    path = labels / f"{spec.series_uid}.nii.gz"
    nib.save(nib.Nifti1Image(mask, affine), path)
    with pytest.raises(UserInputError, match="does not match|differs") as raised:
        read_dicom(data_config(tmp_path / "in", dicom={"labels_dir": str(labels)}), tmp_path / "work")
    assert path.name in str(raised.value)


def write_seg(path: Path, datasets: list[Dataset], mask: np.ndarray, names: list[str]) -> None:
    """A binary DICOM-SEG with one segment per nonzero value of ``mask`` [slice, row, column]."""
    hd = pytest.importorskip("highdicom")
    from pydicom.sr.codedict import codes

    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=name,
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Neoplasm,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for number, name in enumerate(names, start=1)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    one_hot = np.stack([mask == number for number in range(1, len(names) + 1)], axis=-1).astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=one_hot,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=99,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="radsynth tests",
        manufacturer_model_name="test",
        software_versions="0",
        device_serial_number="0",
        omit_empty_frames=True,
    )
    seg.save_as(path)


def test_dicom_seg_becomes_a_label_map_with_its_names(tmp_path):
    spec = SeriesSpec(ramp_volume(slices=6), oblique_geometry())
    datasets = write_series(tmp_path / "in" / "ct", spec)
    mask = np.zeros(spec.volume_hu.shape, np.uint8)
    mask[1:3, 2:6, 1:4] = 1
    mask[4, 5:8, 3:6] = 2
    write_seg(tmp_path / "in" / "seg" / "seg.dcm", datasets, mask, ["liver", "lesion"])

    (record,) = read_dicom(data_config(tmp_path / "in"), tmp_path / "work")
    assert record.label_names == {0: "background", 1: "liver", 2: "lesion"}
    image, label = nib.load(record.image), nib.load(record.label)
    np.testing.assert_allclose(label.affine, image.affine)
    # Map each label voxel back through the standard's equation to the planted mask.
    indices = np.stack(np.meshgrid(*[np.arange(n) for n in label.shape], indexing="ij"), -1).reshape(-1, 3)
    ras = indices @ label.affine[:3, :3].T + label.affine[:3, 3]
    k, r, c = np.rint(spec.geometry.index_of(ras @ LPS_TO_RAS)).astype(int).T
    np.testing.assert_array_equal(np.asarray(label.dataobj).reshape(-1), mask[k, r, c])
    # The SEG's bytes are part of the case digest: without it the series is converted again, label-free.
    (unlabelled,) = read_dicom(data_config(tmp_path / "in", dicom={"use_seg": False}), tmp_path / "work")
    assert unlabelled.label is None and unlabelled.sha256 != record.sha256
    assert not Path(record.label).exists(), "no stale label next to a case that no longer has one"


def edit_seg_frames(path: Path, edit) -> None:
    seg = pydicom.dcmread(path)
    for frame in seg.PerFrameFunctionalGroupsSequence:
        edit(frame)
    seg.save_as(path)


def test_seg_without_spatial_locations_flag_is_checked_by_position(tmp_path):
    # Many SEG writers leave out the optional SpatialLocationsPreserved; the frames' positions decide instead.
    spec = SeriesSpec(ramp_volume(slices=4))
    datasets = write_series(tmp_path / "in", spec)
    mask = (spec.volume_hu > 800).astype(np.uint8)
    seg_path = tmp_path / "in" / "seg.dcm"
    write_seg(seg_path, datasets, mask, ["bright"])

    def drop_flag(frame):
        for source in frame.DerivationImageSequence[0].SourceImageSequence:
            del source.SpatialLocationsPreserved

    edit_seg_frames(seg_path, drop_flag)
    (record,) = read_dicom(data_config(tmp_path / "in"), tmp_path / "work")
    hu = np.asarray(nib.load(record.image).dataobj)
    np.testing.assert_array_equal(np.asarray(nib.load(record.label).dataobj), (hu > 800).astype(np.uint8))

    def shift(frame):
        position = frame.PlanePositionSequence[0].ImagePositionPatient
        position[2] = float(position[2]) + 3.0

    edit_seg_frames(seg_path, shift)
    with pytest.raises(UserInputError, match="does not lie on the slice"):
        read_dicom(data_config(tmp_path / "in"), tmp_path / "work2")


def test_seg_without_highdicom_names_the_extra(tmp_path, monkeypatch):
    spec = SeriesSpec(ramp_volume(slices=3))
    datasets = write_series(tmp_path / "in", spec)
    write_seg(tmp_path / "in" / "seg.dcm", datasets, (spec.volume_hu > 0).astype(np.uint8), ["bright"])
    monkeypatch.setitem(__import__("sys").modules, "highdicom", None)  # import highdicom -> ImportError
    with pytest.raises(UserInputError, match=r"radsynth\[dicom-seg\]"):
        read_dicom(data_config(tmp_path / "in"), tmp_path / "work")


# ------------------------------------------------------------------------------------------- x-ray


def test_digital_radiograph_becomes_a_16_bit_png_case(tmp_path):
    pixels = np.arange(12 * 10, dtype=np.uint16).reshape(12, 10) * 20
    ds = new_dataset(DigitalXRayImageStorageForPresentation)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.ViewPosition, ds.BodyPartExamined = "DX", RAW_PATIENT_ID, "PA", "CHEST"
    ds.ImagerPixelSpacing = [0.15, 0.2]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.tobytes()
    (tmp_path / "in").mkdir()
    ds.save_as(tmp_path / "in" / "cxr.dcm", enforce_file_format=True)

    (record,) = read_dicom(data_config(tmp_path / "in"), tmp_path / "work")
    assert (record.modality, record.shape, record.spacing) == ("xray", (12, 10), (0.15, 0.2))
    assert record.attributes["view"] == "PA"
    with PILImage.open(record.image) as png:
        stored = np.asarray(png)
    # MONOCHROME1 shows low values bright: stored inverted, so bright is high as in every other image.
    np.testing.assert_array_equal(stored, pixels.max() + pixels.min() - pixels)


def test_sidecar_records_no_identifiers(tmp_path):
    spec = SeriesSpec(ramp_volume())
    write_series(tmp_path / "in", spec)
    (record,) = read_dicom(data_config(tmp_path / "in"), tmp_path / "work")
    sidecar = json.loads((Path(record.image).parent / f"{record.case_id}.json").read_text())
    assert sidecar["source_sha256"] == record.sha256
    assert spec.series_uid not in json.dumps(sidecar)


# ------------------------------------------------------------------------------------------- ingest


def test_dicom_series_with_seg_go_through_ingest_with_label_and_image_aligned(tmp_path):
    from radsynth.configs import load_config
    from radsynth.pipelines.data.cache import read_cached_case
    from radsynth.pipelines.data.ingest import ingest

    volume = np.full((12, 16, 14), -900.0, np.float32)  # air-like background, a dense block inside
    mask = np.zeros(volume.shape, np.uint8)
    mask[1:6, 2:9, 6:12] = 1  # off centre on every axis, so a flipped or swapped axis would miss it
    volume[mask == 1] = 300.0
    spec = SeriesSpec(volume, oblique_geometry())
    datasets = write_series(tmp_path / "in" / "ct", spec)
    write_seg(tmp_path / "in" / "seg" / "seg.dcm", datasets, mask, ["organ"])
    config = load_config("ct-abdomen", [f"data.root={tmp_path / 'in'}", "data.format=dicom",
                                        "data.preprocess.target_shape=[16,16,16]", "data.preprocess.target_spacing=null",
                                        f"runtime.output_dir={tmp_path / 'run'}"])
    result = ingest(config, progress=False)
    (record,) = result.records
    assert record.modality == "ct" and record.label_names == {0: "background", 1: "organ"}
    case = read_cached_case(result.cache_dir / f"{record.case_id}.safetensors")
    assert case.label.shape == case.image.shape == (1, 16, 16, 16)
    # HU 300 inside the organ and -900 outside, through the CT window of [-1000, 1000]: 0.3 and -0.9
    # (the block's rim is blended by linear interpolation, hence the margins).
    assert float(np.median(case.image[case.label == 1])) > 0.1
    assert abs(float(np.median(case.image[case.label == 0])) + 0.9) < 0.05

"""The built-in phantoms: determinism, labels that match the sampled findings, frequencies, physics, files."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from radsynth.configs.schema import DataConfig
from radsynth.pipelines.data.adapters.phantom import read_phantom
from radsynth.pipelines.data.io import read_image
from radsynth.pipelines.data.manifest import file_sha256
from radsynth.pipelines.data.phantoms import (
    BRAIN_MRI_FINDING_FREQUENCIES,
    CHEST_XRAY_FINDING_FREQUENCIES,
    CT_TORSO_FINDING_FREQUENCIES,
    KINDS,
    generate_case,
    generate_cohort,
    grid_shape,
    plan_cohort,
    sample_attributes,
)
from radsynth.pipelines.data.phantoms.cohort import GENERATOR_VERSION

SMALL_GRIDS = {"chest_xray": (64, 64), "ct_torso": (32, 32, 32), "mri_torso": (32, 32, 32), "brain_mri": (32, 32, 32)}
# The specified frequencies, written out so that a changed table in the code is caught too.
FREQUENCIES = {
    "chest_xray": {"none": 0.50, "nodule": 0.15, "consolidation": 0.14, "effusion": 0.10, "cardiomegaly": 0.08,
                   "pneumothorax": 0.03},
    "ct_torso": {"none": 0.60, "liver_tumour": 0.28, "lung_nodule": 0.12},
    "mri_torso": {"none": 0.60, "liver_tumour": 0.28, "lung_nodule": 0.12},
    "brain_mri": {"none": 0.70, "tumour": 0.30},
}
# The word a caption must use for each finding, so that text conditioning can learn it.
FINDING_WORDS = {
    "nodule": "nodule",
    "consolidation": "consolidation",
    "effusion": "effusion",
    "pneumothorax": "pneumothorax",
    "cardiomegaly": "cardiomegaly",
    "liver_tumour": "hepatic",
    "lung_nodule": "nodule",
    "tumour": "mass",
}


def cohort(kind: str, n_cases: int, seed: int = 0) -> list:
    return list(generate_cohort(kind, n_cases, seed, size=SMALL_GRIDS["chest_xray"][0], shape=SMALL_GRIDS[kind]))


def case_with_finding(kind: str, finding: str, seed: int = 0):
    """Generate the first case of the cohort whose sampled finding is ``finding`` (without drawing the others)."""
    attributes = sample_attributes(kind, 400, seed)
    index = next(i for i, a in enumerate(attributes) if a["finding"] == finding)
    slot = plan_cohort(kind, 400, seed)[index]
    return generate_case(kind, slot, seed, SMALL_GRIDS[kind])


def data_config(kind: str, n_cases: int, **extra) -> DataConfig:
    grid = {"size": 64} if kind == "chest_xray" else {"shape": [24, 24, 24]}
    return DataConfig(
        name="t", format="phantom", phantom={"kind": kind, "n_cases": n_cases, "seed": 3, **grid},
        preprocess={"target_shape": [64, 64] if kind == "chest_xray" else [24, 24, 24]}, **extra,
    )


# ------------------------------------------------------------------------------------------ determinism


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_gives_identical_cases_and_another_seed_different_ones(kind):
    first, again, other = cohort(kind, 3, seed=5), cohort(kind, 3, seed=5), cohort(kind, 3, seed=6)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.label, b.label)
        assert (a.text, a.attributes, a.patient_id) == (b.text, b.attributes, b.patient_id)
    assert not any(np.array_equal(a.image, c.image) for a, c in zip(first, other))


@pytest.mark.parametrize("kind", KINDS)
def test_a_case_regenerated_alone_equals_the_same_case_in_the_cohort(kind):
    """Each case depends on (seed, index) only, so shards or workers cannot change the result."""
    in_cohort = cohort(kind, 4, seed=2)[3]
    alone = generate_case(kind, plan_cohort(kind, 4, seed=2)[3], 2, SMALL_GRIDS[kind])
    np.testing.assert_array_equal(alone.image, in_cohort.image)
    np.testing.assert_array_equal(alone.label, in_cohort.label)


# ------------------------------------------------------------------------------------ labels & findings


@pytest.mark.parametrize("kind", KINDS)
def test_labels_use_only_the_declared_values_and_shapes_match(kind):
    for case in cohort(kind, 12, seed=1):
        assert case.image.dtype == np.float32 and case.label.dtype == np.uint8
        assert case.image.shape == case.label.shape == SMALL_GRIDS[kind]
        assert set(np.unique(case.label).tolist()) <= set(case.label_names)
        assert len(case.spacing) == case.image.ndim


@pytest.mark.parametrize(
    "kind, finding",
    [(kind, finding) for kind, frequencies in FREQUENCIES.items() for finding in frequencies],
)
def test_a_finding_label_is_drawn_exactly_when_that_finding_is_sampled(kind, finding):
    module = KINDS[kind]
    case = case_with_finding(kind, finding)
    assert case.attributes["finding"] == finding
    drawn = {int(v) for v in np.unique(case.label)} & set(module.FINDING_LABELS.values())
    expected = {module.FINDING_LABELS[finding]} if finding in module.FINDING_LABELS else set()
    assert drawn == expected
    if finding in module.FINDING_LABELS and "side" in case.attributes:
        _assert_on_the_stated_side(kind, case, module.FINDING_LABELS[finding])


def _assert_on_the_stated_side(kind, case, label_value):
    """Patient's right is the image's left on a radiograph (column axis) and high i in RAS volumes (axis 0)."""
    axis = 1 if kind == "chest_xray" else 0
    centroid = np.argwhere(case.label == label_value)[:, axis].mean()
    middle = (case.label.shape[axis] - 1) / 2
    on_low_side = centroid < middle
    assert on_low_side == ((case.attributes["side"] == "right") == (kind == "chest_xray")), case.text


def test_exported_frequency_tables_are_the_specified_ones():
    assert CHEST_XRAY_FINDING_FREQUENCIES == FREQUENCIES["chest_xray"]
    assert CT_TORSO_FINDING_FREQUENCIES == FREQUENCIES["ct_torso"]
    assert BRAIN_MRI_FINDING_FREQUENCIES == FREQUENCIES["brain_mri"]


@pytest.mark.parametrize("kind", KINDS)
def test_finding_frequencies_match_the_configured_ones(kind):
    n = 2000
    counts = Counter(a["finding"] for a in sample_attributes(kind, n, seed=11))
    for finding, p in FREQUENCIES[kind].items():
        tolerance = 4 * math.sqrt(p * (1 - p) / n)  # four binomial standard deviations
        assert abs(counts[finding] / n - p) < tolerance, (finding, counts[finding] / n, p)
    assert set(counts) == set(FREQUENCIES[kind])


def test_chest_views_are_mostly_pa_and_pneumothorax_is_rare():
    attributes = sample_attributes("chest_xray", 2000, seed=4)
    views = Counter(a["view"] for a in attributes)
    assert abs(views["PA"] / 2000 - 0.7) < 0.04
    findings = Counter(a["finding"] for a in attributes)
    assert findings.most_common()[-1][0] == "pneumothorax"


# --------------------------------------------------------------------------------------------- physics


def test_chest_radiograph_intensities_look_projected():
    for case in cohort("chest_xray", 10, seed=8):
        image, label = case.image, case.label
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert image[:4, :4].mean() < 0.1  # air outside the body is dark
        lungs = image[(label == 1) | (label == 2)].mean()
        assert lungs < image[label == 3].mean()  # heart brighter than aerated lung
        assert case.spacing == pytest.approx((400 / 64, 400 / 64))


def test_ct_intensities_are_in_hounsfield_units():
    for case in cohort("ct_torso", 4, seed=9):
        hu, label = case.image, case.label
        assert abs(hu[label == 0].mean() + 1000) < 30  # air
        assert hu[(label == 2) | (label == 3)].mean() < -600  # aerated lung
        assert 30 < hu[label == 4].mean() < 90  # liver
        assert hu[label == 8].mean() > 300  # bone
        assert case.spacing == pytest.approx((350 / 32,) * 3)
    tumour_case = case_with_finding("ct_torso", "liver_tumour")
    assert tumour_case.image[tumour_case.label == 9].mean() < tumour_case.image[tumour_case.label == 4].mean() - 15


def test_liver_is_on_the_patients_right_in_ras_order():
    case = cohort("ct_torso", 1, seed=0)[0]
    liver_i = np.argwhere(case.label == 4)[:, 0].mean()
    spleen_i = np.argwhere(case.label == 5)[:, 0].mean()
    assert liver_i > spleen_i  # i increases towards the patient's right (RAS+), as in real scans reoriented to RAS


def test_torso_mri_is_the_ct_cases_anatomy_voxel_for_voxel_under_mr_contrast():
    spleen_and_kidney = []
    for ct, mri in zip(cohort("ct_torso", 4, seed=5), cohort("mri_torso", 4, seed=5)):
        np.testing.assert_array_equal(mri.label, ct.label)  # a paired set: one label map for both renderings
        assert (mri.patient_id, mri.attributes, mri.spacing) == (ct.patient_id, ct.attributes, ct.spacing)
        assert mri.case_id == ct.case_id.replace("_ct_", "_mr_")
        assert "MRI" in mri.text and "CT" not in mri.text
        signal, label = mri.image, mri.label
        mean = {value: signal[label == value].mean() for value in (0, 2, 4, 5, 6, 8)}
        assert signal.min() >= 0.0 and 0 < mean[0] < 0.1 * mean[4]  # Rician: a small positive floor in air
        assert mean[2] < mean[4] < min(mean[5], mean[6])  # lung < liver < spleen, kidney on T2-SPIR
        spleen_and_kidney.append((mean[5], mean[6]))
        fat = (label == 1) & (ct.image < -60)
        assert signal[fat].mean() < 0.5 * mean[4]  # fat suppressed
    # Spleen and kidney differ by 13% on T2, less than a case's coil bias field may: ordered over the cohort.
    spleen, kidney = np.mean(spleen_and_kidney, axis=0)
    assert spleen < kidney
    tumour_case = case_with_finding("mri_torso", "liver_tumour")
    liver = tumour_case.image[tumour_case.label == 4]
    assert tumour_case.image[tumour_case.label == 9].mean() > liver.mean() * 1.5  # bright on T2, dark on CT
    assert liver.std() > 0.05 * liver.mean()  # texture, bias field and noise: not a flat fill


def test_brain_mri_intensities_are_non_negative_with_dark_csf():
    case = case_with_finding("brain_mri", "tumour")
    image, label = case.image, case.label
    assert image.min() >= 0.0
    assert image[label == 2].mean() < image[label == 1].mean()  # CSF darker than parenchyma on T1


# -------------------------------------------------------------------------------------------- captions


@pytest.mark.parametrize("kind", KINDS)
def test_captions_name_the_finding_its_side_and_the_measured_size(kind):
    for finding in FREQUENCIES[kind]:
        case = case_with_finding(kind, finding)
        text, attributes = case.text.lower(), case.attributes
        assert f"{attributes['age']}-year-old" in text
        assert ("female" if attributes["sex"] == "F" else "male") in text
        if finding in FINDING_WORDS:
            assert FINDING_WORDS[finding] in text
        if "side" in attributes:
            assert attributes["side"] in text
            other = "left" if attributes["side"] == "right" else "right"
            assert other not in text
        if "lesion_size_mm" in attributes:
            assert f"{attributes['lesion_size_mm']} mm" in text


def test_lesion_size_is_measured_on_the_drawn_label():
    case = case_with_finding("chest_xray", "consolidation")
    area_mm2 = (case.label == 5).sum() * case.spacing[0] * case.spacing[1]
    assert case.attributes["lesion_size_mm"] == round(2 * math.sqrt(area_mm2 / math.pi))


# --------------------------------------------------------------------------------------------- adapter


def test_adapter_writes_readable_16_bit_pngs_with_phantom_records(tmp_path):
    data = data_config("chest_xray", 12, modality="ct", label_names={0: "background", 1: "organ"})
    records = read_phantom(data, tmp_path)
    assert [r.case_id for r in records][:2] == ["phantom_cxr_00001", "phantom_cxr_00002"]
    first = generate_case("chest_xray", plan_cohort("chest_xray", 12, 3)[0], 3, grid_shape("chest_xray", 64))
    for record in records:
        assert (record.modality, record.body_region, record.origin, record.split) == ("xray", "chest", "phantom", None)
        assert record.label_names == KINDS["chest_xray"].LABEL_NAMES  # the config's label_names do not apply
        assert record.sha256 == file_sha256(record.image, record.label)
        image = read_image(record.image, pixel_spacing=record.spacing)
        label = read_image(record.label, pixel_spacing=record.spacing)
        assert image.array.dtype == np.uint16 and label.array.dtype == np.uint8
        assert image.array.shape == label.array.shape == tuple(record.shape) == (64, 64)
        assert set(np.unique(label.array).tolist()) <= set(record.label_names)
        assert record.text and record.attributes["finding"] in CHEST_XRAY_FINDING_FREQUENCIES
    stored = read_image(records[0].image).array / 65535
    np.testing.assert_allclose(stored, first.image, atol=1 / 65535)


@pytest.mark.parametrize("kind", ["ct_torso", "mri_torso", "brain_mri"])
def test_adapter_writes_nifti_whose_affine_matches_the_record(tmp_path, kind):
    records = read_phantom(data_config(kind, 3), tmp_path)
    for record in records:
        image, label = read_image(record.image), read_image(record.label)
        assert image.spacing == pytest.approx(record.spacing)
        np.testing.assert_array_equal(image.affine, label.affine)
        assert image.array.shape == tuple(record.shape) == (24, 24, 24)
        assert label.array.dtype == np.uint8
        assert set(np.unique(label.array).tolist()) <= set(record.label_names)
    assert records[0].modality == ("ct" if kind == "ct_torso" else "mri")
    if kind == "ct_torso":
        assert read_image(records[0].image).array.min() <= -990  # stored in HU


def test_adapter_reuses_a_complete_folder_and_redoes_an_incomplete_one(tmp_path):
    data = data_config("chest_xray", 5)
    records = read_phantom(data, tmp_path)
    folder = tmp_path / f"phantom-chest_xray-v{GENERATOR_VERSION}-3-5-64"
    manifest = folder / "cases.jsonl"
    stamps = {p: p.stat().st_mtime_ns for p in [manifest, *folder.rglob("*.png")]}
    again = read_phantom(data, tmp_path)
    assert again == records
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing rewritten

    manifest.unlink()  # as if the run had stopped before finishing
    assert read_phantom(data, tmp_path) == records
    assert manifest.is_file()


def test_patients_have_several_cases_with_the_same_sex_and_close_ages(tmp_path):
    records = read_phantom(data_config("chest_xray", 60), tmp_path)
    by_patient: dict[str, list] = {}
    for record in records:
        by_patient.setdefault(record.patient_id, []).append(record)
    assert 1.15 < len(records) / len(by_patient) < 1.8
    followed_up = [cases for cases in by_patient.values() if len(cases) > 1]
    assert followed_up
    for cases in followed_up:
        assert len({c.attributes["sex"] for c in cases}) == 1
        ages = [c.attributes["age"] for c in cases]
        assert max(ages) - min(ages) <= 2

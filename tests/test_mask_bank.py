"""The mask bank on real phantom label maps: only training cases are drawn, provenance names the source,
a mirror keeps "right_lung" on the patient's right, scaling and elastic warps change volumes as intended,
draws are reproducible, filters work, and bad input is a one-line user error."""

from __future__ import annotations

import json

import numpy as np
import pytest

from radsynth.configs import load_config
from radsynth.configs.errors import UserInputError
from radsynth.pipelines.data.ingest import ingest
from radsynth.pipelines.data.phantoms import generate_case, plan_cohort, sample_attributes
from radsynth.pipelines.masks import BankAugmentation, BankMask, MaskBank, Orientation, default_orientation
from radsynth.pipelines.masks.mask_bank import elastic_deform, smooth_label_edges

# Every augmentation off: a test turns on the one it is about.
NOTHING = BankAugmentation(lr_flip_probability=0.0, scale_probability=0.0, elastic_probability=0.0, smooth_sigma=0.0)
# Fine enough that lungs, heart and liver cover 500+ voxels, small enough to be quick.
GRIDS = {"chest_xray": (128, 128), "ct_torso": (48, 48, 48), "brain_mri": (48, 48, 48)}
TINY_INGESTS = {
    "chest_xray": ("demo", ["data.phantom.n_cases=24", "data.phantom.size=64", "data.preprocess.target_shape=[64,64]"]),
    "ct_torso": ("demo-3d", ["data.phantom.n_cases=10", "data.phantom.shape=[32,32,32]",
                             "data.preprocess.target_shape=[32,32,32]"]),
}


def phantom_case(kind: str, finding: str = "none", side: str | None = None, seed: int = 0):
    """The first case of a cohort with this finding (and side), drawn without drawing the others."""
    attributes = sample_attributes(kind, 200, seed)
    index = next(i for i, a in enumerate(attributes) if a["finding"] == finding and side in (None, a.get("side")))
    return generate_case(kind, plan_cohort(kind, 200, seed)[index], seed, GRIDS[kind])


def bank_of(case, augmentation: BankAugmentation = NOTHING) -> MaskBank:
    return MaskBank([(case.case_id, case.label, case.spacing, case.attributes)], case.label_names, augmentation)


def draw_one(bank: MaskBank, seed: int = 0) -> BankMask:
    return bank.draw(np.random.default_rng(seed))[0]


def value_of(label_names, name: str) -> int:
    return next(int(value) for value, known in label_names.items() if known == name)


def volumes(label_map: np.ndarray) -> dict[int, int]:
    values, counts = np.unique(label_map, return_counts=True)
    return dict(zip(values.tolist(), counts.tolist()))


def centroid(mask: np.ndarray) -> np.ndarray:
    return np.array([axis.mean() for axis in np.nonzero(mask)])


def touches_edge(mask: np.ndarray) -> bool:
    return any(np.take(mask, index, axis=axis).any() for axis in range(mask.ndim) for index in (0, -1))


def augmentation_names(mask: BankMask) -> list[str]:
    return [step["name"] for step in mask.provenance["augmentations"]]


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> dict:
    """A real tiny ingest per kind: (config, records), with its preprocessed cache on disk."""
    runs = {}
    for kind, (preset, overrides) in TINY_INGESTS.items():
        output = tmp_path_factory.mktemp(kind)
        config = load_config(preset, [*overrides, "data.split.stratify_by=null", f"runtime.output_dir={output}"])
        runs[kind] = (config, ingest(config, progress=False).records)
    return runs


@pytest.fixture(scope="module")
def cases() -> dict:
    return {"chest": phantom_case("chest_xray"), "chest_nodule": phantom_case("chest_xray", "nodule", "right"),
            "ct": phantom_case("ct_torso"), "brain": phantom_case("brain_mri", "tumour", "right")}


# ------------------------------------------------------------------------------------------ the train split


@pytest.mark.parametrize("kind", sorted(TINY_INGESTS))
def test_a_bank_from_an_ingest_holds_and_draws_only_training_cases(ingested, kind):
    config, records = ingested[kind]
    train = {r.case_id for r in records if r.split == "train"}
    unseen = {r.case_id for r in records if r.split in ("holdout", "test")}
    assert train and unseen
    bank = MaskBank.from_ingest(config, BankAugmentation(scale_probability=1.0, elastic_probability=1.0))
    assert set(bank.case_ids) == train

    # Phantoms are read in the layout they draw (lesion_edits' defaults): films for 2D, ct_torso for 3D.
    assert {entry.orientation for entry in bank.entries} == {default_orientation(config.data.spatial_dims)}
    cached = bank.entries[0].load()
    assert cached.shape == (1, *config.data.preprocess.target_shape)  # the cache keeps a channel axis
    masks = bank.draw(np.random.default_rng(0), n=4 * len(train))
    assert {mask.provenance["source_case_id"] for mask in masks} <= train
    assert len({mask.provenance["source_case_id"] for mask in masks}) > len(train) // 2
    assert all(mask.label_map.shape == cached.shape and mask.label_map.dtype == cached.dtype for mask in masks)


def test_real_3d_cases_take_their_orientation_from_the_cached_affine(ingested):
    config, records = ingested["ct_torso"]
    real = [record.model_copy(update={"origin": "real"}) for record in records]
    bank = MaskBank.from_records(real, MaskBank.from_ingest(config).entries[0].label_map.parent)
    # The cache is in RAS: axis 0 runs towards the patient's right (right at high index), axis 2 upwards.
    assert {entry.orientation for entry in bank.entries} == {Orientation(0, 2, False, False)}


def test_provenance_is_json_ready_and_names_the_source_case(cases):
    case = cases["chest_nodule"]
    augmentation = BankAugmentation(lr_flip_probability=1.0, flip_lateralised_anatomy=True, scale_probability=1.0,
                                    elastic_probability=1.0)
    mask = draw_one(bank_of(case, augmentation))
    provenance = json.loads(json.dumps(mask.provenance))
    assert provenance["mask_source"] == "bank" and provenance["derived_from_real"] is True
    assert provenance["source_case_id"] == case.case_id
    assert [step["name"] for step in provenance["augmentations"]] == ["flip_left_right", "scale", "elastic",
                                                                      "smooth_edges"]
    assert all(set(step) == {"name", "params"} for step in provenance["augmentations"])


def test_an_augmentation_is_rebuilt_from_its_recorded_params(cases):
    case = cases["ct"]
    augmentation = BankAugmentation(lr_flip_probability=0.0, scale_probability=0.0, elastic_probability=1.0,
                                    smooth_sigma=0.0)
    mask = draw_one(bank_of(case, augmentation), seed=3)
    (step,) = mask.provenance["augmentations"]
    params = step["params"]
    rebuilt = elastic_deform(case.label, params["sigma"], params["magnitude"],
                             np.random.default_rng(params["field_seed"]))
    np.testing.assert_array_equal(mask.label_map, rebuilt)


# ---------------------------------------------------------------------------------------------- flips


def swapped_mirror(label_map: np.ndarray, label_names, axis: int) -> np.ndarray:
    """The expected mirror, written out by hand: right_* and left_* labels trade values."""
    mirrored = np.flip(label_map, axis=axis)
    expected = mirrored.copy()
    for name in label_names.values():
        if name.startswith("right_"):
            right, left = value_of(label_names, name), value_of(label_names, "left_" + name[len("right_"):])
            expected[mirrored == right], expected[mirrored == left] = left, right
    return expected


@pytest.mark.parametrize("name", ["chest_nodule", "ct"])
def test_a_left_right_flip_swaps_sided_labels_so_right_stays_the_patients_right(cases, name):
    case = cases[name]
    augmentation = BankAugmentation(lr_flip_probability=1.0, flip_lateralised_anatomy=True, scale_probability=0.0,
                                    elastic_probability=0.0)
    mask = draw_one(bank_of(case, augmentation))
    orientation = default_orientation(case.label.ndim)
    assert augmentation_names(mask) == ["flip_left_right"]
    assert mask.provenance["augmentations"][0]["params"]["axis"] == orientation.lr_axis
    np.testing.assert_array_equal(mask.label_map, swapped_mirror(case.label, case.label_names, orientation.lr_axis))

    right, left = (centroid(mask.label_map == value_of(case.label_names, side + "_lung"))[orientation.lr_axis]
                   for side in ("right", "left"))
    assert (right < left) == orientation.right_is_low_index
    # The anatomy did move: the unsided heart / liver is now on the other side of the array.
    unsided = value_of(case.label_names, "heart" if case.label.ndim == 2 else "liver")
    before = centroid(case.label == unsided)[orientation.lr_axis]
    after = centroid(mask.label_map == unsided)[orientation.lr_axis]
    assert (before - case.label.shape[orientation.lr_axis] / 2) * (after - case.label.shape[orientation.lr_axis] / 2) < 0


def test_a_mirrored_mask_reports_the_finding_on_the_other_side(cases):
    case = cases["chest_nodule"]
    assert case.attributes["side"] == "right"
    augmentation = BankAugmentation(lr_flip_probability=1.0, flip_lateralised_anatomy=True, scale_probability=0.0,
                                    elastic_probability=0.0)
    mask = draw_one(bank_of(case, augmentation))
    assert mask.attributes["side"] == "left" and mask.attributes["finding"] == "nodule"
    nodule = mask.label_map == value_of(case.label_names, "nodule")
    lungs = np.isin(mask.label_map, [value_of(case.label_names, "right_lung"), value_of(case.label_names, "left_lung")])
    # Radiographic display: the patient's left is at high column index.
    assert centroid(nodule)[1] > centroid(lungs)[1]


def test_by_default_a_flip_spares_lateralised_anatomy_and_mirrors_a_brain(cases):
    always = BankAugmentation(lr_flip_probability=1.0, scale_probability=0.0, elastic_probability=0.0)
    for name in ("chest", "ct"):  # heart / liver and spleen would land on the wrong side
        mask = draw_one(bank_of(cases[name], always))
        assert augmentation_names(mask) == []
        np.testing.assert_array_equal(mask.label_map, cases[name].label)
    brain = draw_one(bank_of(cases["brain"], always))
    assert augmentation_names(brain) == ["flip_left_right"]
    np.testing.assert_array_equal(brain.label_map, np.flip(cases["brain"].label, axis=0))


def test_a_sided_label_without_its_counterpart_is_never_mirrored(cases):
    case = cases["brain"]
    label_map = case.label.copy()
    label_map[:8, :8, :8] = 4  # a right-only structure: mirrored, it would sit on the left still named right
    names = {**case.label_names, 4: "right_adrenal"}
    augmentation = BankAugmentation(lr_flip_probability=1.0, flip_lateralised_anatomy=True, scale_probability=0.0,
                                    elastic_probability=0.0)
    bank = MaskBank([(case.case_id, label_map, case.spacing, case.attributes)], names, augmentation)
    assert augmentation_names(draw_one(bank)) == []


# --------------------------------------------------------------------------------- scaling and warping


@pytest.mark.parametrize("name", ["chest", "ct"])
def test_augmented_maps_keep_shape_dtype_and_every_source_label(cases, name):
    case = cases["chest_nodule"] if name == "chest" else phantom_case("ct_torso", "lung_nodule")
    augmentation = BankAugmentation(lr_flip_probability=1.0, flip_lateralised_anatomy=True, scale_probability=1.0,
                                    scale_range=(0.8, 0.9), elastic_probability=1.0, elastic_magnitude=2.0)
    masks = bank_of(case, augmentation).draw(np.random.default_rng(0), n=4)
    source_labels = set(np.unique(case.label).tolist())
    for mask in masks:
        assert mask.label_map.shape == case.label.shape and mask.label_map.dtype == case.label.dtype
        assert set(np.unique(mask.label_map).tolist()) == source_labels  # the small nodule survives too
        assert not np.array_equal(mask.label_map, case.label)


@pytest.mark.parametrize("name", ["chest", "ct"])
@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_scaling_changes_each_label_volume_by_the_factor_to_the_ndim(cases, name, factor):
    case = cases[name]
    augmentation = BankAugmentation(lr_flip_probability=0.0, scale_probability=1.0, scale_range=(factor, factor),
                                    elastic_probability=0.0, smooth_sigma=0.0)
    mask = draw_one(bank_of(case, augmentation))
    assert augmentation_names(mask) == ["scale"]
    assert mask.provenance["augmentations"][0]["params"]["factor"] == pytest.approx(factor)
    before, after = volumes(case.label), volumes(mask.label_map)
    # Labels cut by the field of view (the CT body) cannot grow along the cut axis; small ones are too grainy.
    checked = [v for v, n in before.items() if v != 0 and n >= 500 and not touches_edge(case.label == v)]
    assert len(checked) >= 2
    for value in checked:
        assert after[value] / before[value] == pytest.approx(factor ** case.label.ndim, rel=0.1), case.label_names[value]


@pytest.mark.parametrize("name", ["chest", "ct"])
def test_elastic_deformation_keeps_volumes_and_moves_boundaries(cases, name):
    case = cases[name]
    augmentation = BankAugmentation(lr_flip_probability=0.0, scale_probability=0.0, elastic_probability=1.0,
                                    smooth_sigma=0.0)
    before = volumes(case.label)
    checked = [value for value, n in before.items() if value != 0 and n >= 500]
    assert len(checked) >= 3
    for seed in range(3):
        mask = draw_one(bank_of(case, augmentation), seed)
        assert augmentation_names(mask) == ["elastic"]
        after = volumes(mask.label_map)
        for value in checked:
            assert after[value] / before[value] == pytest.approx(1.0, abs=0.1), case.label_names[value]
        moved = mask.label_map != case.label
        assert moved.mean() > 0.01
        # A smooth warp shifts edges; it does not relabel the inside of an organ.
        interior = np.ones_like(moved)
        for axis in range(case.label.ndim):
            for shift in (-3, 3):
                interior &= np.roll(case.label, shift, axis=axis) == case.label
        assert moved[interior].mean() < 0.1 * moved.mean()


def staircase_edges(label_map: np.ndarray) -> int:
    """Neighbouring voxel pairs with different labels: the boundary's length (2D) or area (3D) in voxels."""
    return sum(int((np.diff(label_map, axis=axis) != 0).sum()) for axis in range(label_map.ndim))


def test_edge_smoothing_shortens_boundaries_and_keeps_even_a_one_voxel_label(cases):
    case = cases["chest"]
    jagged = elastic_deform(case.label, sigma=2.0, magnitude=1.5, rng=np.random.default_rng(0))
    jagged[5, 5] = 7  # a one-voxel lesion that no smoothing can let win its voxel
    smoothed = smooth_label_edges(jagged, sigma=1.0)
    assert staircase_edges(smoothed) < 0.9 * staircase_edges(jagged)
    assert set(np.unique(smoothed).tolist()) == set(np.unique(jagged).tolist())
    assert smoothed[5, 5] == 7 and smoothed.dtype == jagged.dtype


def test_default_settings_draw_varied_masks_with_smooth_edges(cases):
    case = cases["ct"]
    masks = bank_of(case, BankAugmentation()).draw(np.random.default_rng(0), n=8)
    warped = [mask for mask in masks if {"scale", "elastic"} & set(augmentation_names(mask))]
    assert warped and all(augmentation_names(mask)[-1] == "smooth_edges" for mask in warped)
    assert "flip_left_right" not in {name for mask in masks for name in augmentation_names(mask)}  # liver, spleen


# ----------------------------------------------------------------------------------- seeds and filters


def test_the_same_seed_draws_the_same_masks(ingested):
    config, _ = ingested["chest_xray"]
    bank = MaskBank.from_ingest(config, BankAugmentation(flip_lateralised_anatomy=True))
    first, again = (bank.draw(np.random.default_rng(11), n=6) for _ in range(2))
    other = bank.draw(np.random.default_rng(12), n=6)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a.label_map, b.label_map)
        assert a.provenance == b.provenance and a.attributes == b.attributes
    assert any(not np.array_equal(a.label_map, b.label_map) for a, b in zip(first, other))


def test_filters_keep_training_cases_with_the_attribute_or_the_labels(ingested):
    config, records = ingested["chest_xray"]
    train = [r for r in records if r.split == "train"]
    nodule_cases = {r.case_id for r in train if r.attributes["finding"] == "nodule"}
    assert 0 < len(nodule_cases) < len(train)
    assert set(MaskBank.from_ingest(config, where={"finding": "nodule"}).case_ids) == nodule_cases
    either = {r.case_id for r in train if r.attributes["finding"] in ("nodule", "effusion")}
    assert set(MaskBank.from_ingest(config, where={"finding": ["nodule", "effusion"]}).case_ids) == either

    bank = MaskBank.from_ingest(config, BankAugmentation(scale_probability=1.0, scale_range=(0.8, 0.8)),
                                require_labels=["nodule"])
    nodule = value_of(train[0].label_names, "nodule")
    with_label = {entry.case_id for entry in MaskBank.from_ingest(config).entries if (entry.load() == nodule).any()}
    assert with_label and set(bank.case_ids) == with_label
    assert all((mask.label_map == nodule).any() for mask in bank.draw(np.random.default_rng(0), n=10))


def test_a_finding_seen_only_outside_the_train_split_gives_an_empty_bank(ingested):
    config, records = ingested["chest_xray"]
    train_findings = {r.attributes["finding"] for r in records if r.split == "train"}
    unseen = sorted({r.attributes["finding"] for r in records if r.split != "train"} - train_findings)
    assert unseen, "the tiny cohort should hold a finding that only holdout/test cases have"
    with pytest.raises(UserInputError, match=f"none of the .* training cases has finding={unseen[0]}") as error:
        MaskBank.from_ingest(config, where={"finding": unseen[0]})
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"where": {"findng": "nodule"}}, "mask_bank: unknown attribute 'findng' in the filter; attributes of"),
        ({"require_labels": ["tumour"]}, "mask_bank: unknown required label 'tumour'; known labels: right_lung"),
        ({"where": {"finding": "nodule"}, "require_labels": ["pneumothorax"]},
         "mask_bank: none of the 17 training cases has finding=nodule and label pneumothorax"),
    ],
)
def test_bad_filters_are_one_line_user_errors(ingested, options, message):
    config, records = ingested["chest_xray"]
    assert sum(r.split == "train" for r in records) == 17
    with pytest.raises(UserInputError) as error:
        MaskBank.from_ingest(config, **options)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_bad_settings_and_a_missing_ingest_are_one_line_user_errors(tmp_path, cases):
    with pytest.raises(UserInputError, match="scale_range"):
        BankAugmentation(scale_range=(1.2, 0.8))
    with pytest.raises(UserInputError, match="lr_flip_probability"):
        BankAugmentation(lr_flip_probability=1.5)
    with pytest.raises(UserInputError, match="manifest not found"):
        MaskBank.from_ingest(load_config("demo", [f"runtime.output_dir={tmp_path}"]))
    case = cases["chest"]
    with pytest.raises(UserInputError, match="label values \\[9\\] are not in the label names"):
        MaskBank([("x", np.full_like(case.label, 9), case.spacing, {})], case.label_names)
    with pytest.raises(UserInputError, match="holds float32"):
        MaskBank([("x", case.label.astype(np.float32), case.spacing, {})], case.label_names)


def test_an_orientation_names_the_axis_a_mirror_runs_along(cases):
    case = cases["brain"]
    transposed = np.ascontiguousarray(np.moveaxis(case.label, 0, 1))  # left-right now runs along axis 1
    orientation = Orientation(lr_axis=1, cc_axis=2, right_is_low_index=True, superior_is_low_index=False)
    augmentation = BankAugmentation(lr_flip_probability=1.0, scale_probability=0.0, elastic_probability=0.0)
    bank = MaskBank([(case.case_id, transposed, case.spacing, {})], case.label_names, augmentation,
                    orientation=orientation)
    mask = draw_one(bank)
    assert mask.orientation == orientation
    np.testing.assert_array_equal(mask.label_map, np.flip(transposed, axis=1))

"""Lesion edits on the built-in phantoms' label maps: sizes are hit, lesions stay in their organ and on the
asked side and level, nothing else changes, removal restores the organ, and bad requests are one-line errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage

from radsynth.configs.errors import UserInputError
from radsynth.pipelines.data.phantoms import (
    BRAIN_MRI_LABEL_NAMES,
    CHEST_XRAY_LABEL_NAMES,
    CT_TORSO_LABEL_NAMES,
    generate_case,
    plan_cohort,
    sample_attributes,
)
from radsynth.pipelines.masks import (
    LesionRequest,
    Orientation,
    apply_lesion_edit,
    default_orientation,
    orientation_from_affine,
    parse_lesion_request,
)

# Fine enough that an 8 mm nodule covers ~20 pixels and a 20 mm tumour ~10 voxels, small enough to be quick.
GRIDS = {"chest_xray": (256, 256), "ct_torso": (48, 48, 48), "brain_mri": (48, 48, 48)}
# How the phantoms lay out the patient, written out here so that a changed default in the code is caught:
# (left-right axis, cranio-caudal axis, patient right at low index, superior at low index).
PHANTOM_AXES = {"chest_xray": (1, 0, True, True), "ct_torso": (0, 2, False, False), "brain_mri": (0, 2, False, False)}


def phantom_case(kind: str, finding: str, side: str | None = None, seed: int = 0):
    """The first case of a cohort with this finding (and side), drawn without drawing the others."""
    attributes = sample_attributes(kind, 400, seed)
    index = next(i for i, a in enumerate(attributes) if a["finding"] == finding and side in (None, a.get("side")))
    return generate_case(kind, plan_cohort(kind, 400, seed)[index], seed, GRIDS[kind])


CASES = {
    "chest": ("chest_xray", "none", None),
    "ct": ("ct_torso", "none", None),
    "brain": ("brain_mri", "none", None),
    "chest_nodule": ("chest_xray", "nodule", "right"),
    "ct_tumour": ("ct_torso", "liver_tumour", None),
    "brain_tumour": ("brain_mri", "tumour", "right"),
}


@pytest.fixture(scope="module")
def cases() -> dict:
    return {name: phantom_case(*spec) for name, spec in CASES.items()}


def edit(case, request: str | LesionRequest, label: np.ndarray | None = None, seed: int = 0):
    if isinstance(request, str):
        request = parse_lesion_request(request, case.label_names)
    label = case.label if label is None else label
    return apply_lesion_edit(label, case.spacing, request, case.label_names, np.random.default_rng(seed))


def value_of(case, name: str) -> int:
    return next(value for value, known in case.label_names.items() if known == name)


def measured_volume(mask: np.ndarray, spacing) -> float:
    """Area in mm^2 (2D) or volume in ml (3D), counted on the map itself."""
    measure = float(mask.sum()) * float(np.prod(spacing))
    return measure if mask.ndim == 2 else measure / 1000.0


def ball_volume(diameter_mm: float, ndim: int) -> float:
    """Disc area in mm^2 or ball volume in ml."""
    return math.pi / 4 * diameter_mm**2 if ndim == 2 else math.pi / 6 * diameter_mm**3 / 1000.0


def centroid(mask: np.ndarray) -> np.ndarray:
    return np.array([axis.mean() for axis in np.nonzero(mask)])


def assert_only_organ_became_lesion(before, after, organ_values, lesion_value) -> np.ndarray:
    changed = before != after
    assert changed.any()
    assert np.all(after[changed] == lesion_value)
    assert np.all(np.isin(before[changed], organ_values))
    return changed


def third_of(mask: np.ndarray, point: np.ndarray, kind: str) -> str:
    """Which cranio-caudal third of ``mask`` a point lies in, counted from the superior end."""
    _, cc_axis, _, superior_low = PHANTOM_AXES[kind]
    rows = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != cc_axis)))
    from_top = point[cc_axis] - rows.min() if superior_low else rows.max() - point[cc_axis]
    return ("upper", "middle", "lower")[min(int(3 * (from_top + 0.5) / (rows.max() - rows.min() + 1)), 2)]


def side_of_point(point: np.ndarray, reference: np.ndarray, kind: str) -> str:
    """The patient side of ``point`` relative to the centroid of ``reference``."""
    lr_axis, _, right_low, _ = PHANTOM_AXES[kind]
    low = point[lr_axis] < centroid(reference)[lr_axis]
    return "right" if low == right_low else "left"


# ---------------------------------------------------------------------------------------------- parser

CXR, CT, BRAIN = CHEST_XRAY_LABEL_NAMES, CT_TORSO_LABEL_NAMES, BRAIN_MRI_LABEL_NAMES


@pytest.mark.parametrize(
    ("text", "names", "expected"),
    [
        ("liver tumour 20-40 mm", CT, LesionRequest("insert", "liver_tumour", ("liver",), (20.0, 40.0))),
        ("right lower lobe nodule 8 mm", CT,
         LesionRequest("insert", "lung_nodule", ("right_lung",), 8.0, side="right", level="lower")),
        ("right lower lobe nodule 8 mm", CXR,
         LesionRequest("insert", "nodule", ("right_lung",), 8.0, side="right", level="lower")),
        ("nodule 8 mm in right lung upper", CXR,
         LesionRequest("insert", "nodule", ("right_lung",), 8.0, side="right", level="upper")),
        ("nodule 2 cm", CXR, LesionRequest("insert", "nodule", ("right_lung", "left_lung"), 20.0)),
        ("add consolidation 12 cm2 left lung", CXR,
         LesionRequest("insert", "consolidation", ("left_lung",), 1200.0, "mm2", side="left")),
        ("remove nodule", CXR, LesionRequest("remove", "nodule")),
        ("remove nodule", CT, LesionRequest("remove", "lung_nodule")),
        ("remove the nodule from the left lung", CXR, LesionRequest("remove", "nodule", ("left_lung",), side="left")),
        ("resize tumour to 15 ml", BRAIN, LesionRequest("resize", "tumour", (), 15.0, "ml")),
        ("resize tumour to 15 ml", CT, LesionRequest("resize", "liver_tumour", (), 15.0, "ml")),
        ("move nodule to left lung", CXR, LesionRequest("move", "nodule", ("left_lung",), side="left")),
        ("Tumor 3cm in the left hemisphere", BRAIN, LesionRequest("insert", "tumour", ("brain",), 30.0, side="left")),
        ("tumour 10 to 20 mm", BRAIN, LesionRequest("insert", "tumour", ("brain",), (10.0, 20.0))),
    ],
)
def test_parser_known_answers(text, names, expected):
    assert parse_lesion_request(text, names) == expected


AMBIGUOUS = {0: "background", 1: "liver", 2: "brain", 3: "liver_tumour", 4: "brain_tumour"}
NO_HOST = {0: "background", 1: "heart", 2: "nodule"}


@pytest.mark.parametrize(
    ("text", "names", "problem"),
    [
        ("", CXR, "names 0 lesions"),
        ("right lung 8 mm", CXR, "names 0 lesions"),
        ("liver tumour 20 mm", BRAIN, "'liver' is not a label"),
        ("nodule 8 mm in liver", CXR, "'liver' is not a label"),
        ("nodule 8 parsecs", CXR, "'8' is not a label"),
        ("nodule", CXR, "insert needs a size"),
        ("resize nodule", CXR, "resize needs a size"),
        ("remove nodule 8 mm", CXR, "remove takes no size"),
        ("move nodule 8 mm", CXR, "move takes no size"),
        ("nodule 8 mm 10 mm", CXR, "more than one size"),
        ("right left nodule 8 mm", CXR, "more than one side"),
        ("upper lower nodule 8 mm", CXR, "more than one level"),
        ("nodule 40-20 mm", CXR, "runs backwards"),
        ("nodule 0 mm", CXR, "size 0.0"),
        ("nodule tumour 8 mm", CT, "names 2 lesions"),
        ("tumour 8 mm in liver spleen", CT, "names 2 organs"),
        ("tumour 20 mm", AMBIGUOUS, "could be any of"),
        ("nodule 8 mm", NO_HOST, "no organ given for 'nodule'"),
    ],
)
def test_parser_rejects_bad_text_in_one_line(text, names, problem):
    with pytest.raises(UserInputError) as caught:
        parse_lesion_request(text, names)
    message = str(caught.value)
    assert message.startswith(f"lesions: cannot read '{text}': ")
    assert problem in message
    assert "\n" not in message
    assert "known labels: " in message and all(name in message for name in names.values() if name != "background")


# ---------------------------------------------------------------------------------------------- insert

@pytest.mark.parametrize(
    ("case_name", "text", "organ", "lesion"),
    [
        ("chest", "nodule 8 mm in the right lung", "right_lung", "nodule"),
        ("ct", "liver tumour 20-40 mm", "liver", "liver_tumour"),
        ("brain", "tumour 25 mm", "brain", "tumour"),
    ],
)
def test_insert_hits_the_size_inside_the_organ_and_changes_nothing_else(cases, case_name, text, organ, lesion):
    case = cases[case_name]
    request = parse_lesion_request(text, case.label_names)
    label, record = edit(case, request)
    lesion_value = value_of(case, lesion)
    changed = assert_only_organ_became_lesion(case.label, label, [value_of(case, organ)], lesion_value)
    diameter = request.size if record.drawn_size is None else record.drawn_size
    if isinstance(request.size, tuple):
        assert request.size[0] <= diameter <= request.size[1]
    requested = ball_volume(diameter, label.ndim)
    assert measured_volume(changed, case.spacing) == pytest.approx(requested, rel=0.10)
    assert record.voxel_count == int(changed.sum()) == int((label == lesion_value).sum())
    assert record.achieved_volume == pytest.approx(measured_volume(changed, case.spacing))
    assert record.requested_volume == pytest.approx(requested)
    assert record.organ_labels == (organ,)
    assert changed[record.centre_voxel]
    assert ndimage.label(changed)[1] == 1  # one lesion, not scattered voxels


@pytest.mark.parametrize(
    ("case_name", "text", "organ", "reference", "side", "level"),
    [
        ("chest", "nodule 8 mm in right lung upper", "right_lung", ("right_lung", "left_lung"), "right", "upper"),
        ("chest", "left lower lobe nodule 10 mm", "left_lung", ("right_lung", "left_lung"), "left", "lower"),
        ("ct", "right lower liver tumour 25 mm", "liver", ("liver",), "right", "lower"),
        ("ct", "left upper lobe nodule 20 mm", "left_lung", ("right_lung", "left_lung"), "left", "upper"),
        ("brain", "left upper tumour 30 mm", "brain", ("brain",), "left", "upper"),
        ("brain", "right middle tumour 20 mm", "brain", ("brain",), "right", "middle"),
    ],
)
def test_insert_lands_on_the_requested_side_and_level(cases, case_name, text, organ, reference, side, level):
    case = cases[case_name]
    kind = CASES[case_name][0]
    for seed in range(3):
        label, record = edit(case, text, seed=seed)
        lesion = label != case.label
        assert np.all(case.label[lesion] == value_of(case, organ))
        point = centroid(lesion)
        assert side_of_point(point, np.isin(case.label, [value_of(case, r) for r in reference]), kind) == side
        assert third_of(case.label == value_of(case, organ), point, kind) == level


def test_insert_is_reproducible_and_draws_its_size_from_the_range(cases):
    case = cases["ct"]
    first = edit(case, "liver tumour 20-40 mm", seed=5)
    again = edit(case, "liver tumour 20-40 mm", seed=5)
    assert np.array_equal(first[0], again[0]) and first[1] == again[1]
    drawn = {edit(case, "liver tumour 20-40 mm", seed=seed)[1].drawn_size for seed in range(6)}
    assert len(drawn) == 6 and all(20.0 <= d <= 40.0 for d in drawn)


def test_irregular_lesion_keeps_its_voxel_count_but_not_the_ball_shape(cases):
    case = cases["brain"]
    base = LesionRequest("insert", "tumour", "brain", 30.0)
    ball, ball_record = edit(case, base, seed=2)
    bumpy, bumpy_record = edit(case, LesionRequest("insert", "tumour", "brain", 30.0, irregularity=0.5), seed=2)
    assert bumpy_record.voxel_count == ball_record.voxel_count
    assert bumpy_record.centre_voxel == ball_record.centre_voxel  # same draw of the centre, different surface
    assert not np.array_equal(ball, bumpy)
    assert np.all(case.label[bumpy == value_of(case, "tumour")] == value_of(case, "brain"))


# ---------------------------------------------------------------------------------------- resize, move

@pytest.mark.parametrize(
    ("case_name", "text", "organ", "lesion", "requested"),
    [
        ("chest_nodule", "resize nodule to 20 mm", "right_lung", "nodule", ball_volume(20.0, 2)),
        ("ct_tumour", "resize tumour to 15 ml", "liver", "liver_tumour", 15.0),
        ("brain_tumour", "resize tumour to 20 ml", "brain", "tumour", 20.0),
    ],
)
def test_resize_regrows_around_the_lesion_to_the_new_size(cases, case_name, text, organ, lesion, requested):
    case = cases[case_name]
    lesion_value, organ_value = value_of(case, lesion), value_of(case, organ)
    label, record = edit(case, text)
    before, after = case.label == lesion_value, label == lesion_value
    assert measured_volume(after, case.spacing) == pytest.approx(requested, rel=0.10)
    changed = case.label != label
    assert np.all(np.isin(case.label[changed], [lesion_value, organ_value]))
    assert np.all(np.isin(label[changed], [lesion_value, organ_value]))
    shift_mm = np.linalg.norm((centroid(after) - centroid(before)) * np.asarray(case.spacing))
    assert shift_mm < record.achieved_diameter_mm / 2
    assert record.previous_centre_voxel is not None and record.organ_labels == (organ,)


def test_move_to_the_other_lung_keeps_the_voxel_count_and_restores_the_old_place(cases):
    case = cases["chest_nodule"]
    nodule, right, left = (value_of(case, name) for name in ("nodule", "right_lung", "left_lung"))
    label, record = edit(case, "move nodule to left lung")
    old, new = case.label == nodule, label == nodule
    assert int(new.sum()) == int(old.sum()) == record.voxel_count
    assert np.all(case.label[new] == left)
    assert np.all(label[old] == right)
    changed = case.label != label
    assert np.array_equal(changed, old ^ new)


def test_move_without_a_target_lands_away_from_the_old_place(cases):
    case = cases["brain_tumour"]
    tumour, brain = value_of(case, "tumour"), value_of(case, "brain")
    before = case.label == tumour
    for seed in range(5):
        label, record = edit(case, "move tumour", seed=seed)
        after = label == tumour
        assert int(after.sum()) == int(before.sum())
        assert np.all(label[before & ~after] == brain) and np.all(np.isin(case.label[after], [tumour, brain]))
        distance_mm = np.linalg.norm((centroid(after) - centroid(before)) * np.asarray(case.spacing))
        assert distance_mm >= 0.9 * record.achieved_diameter_mm


def test_move_without_a_target_lands_away_from_the_old_place_in_a_small_organ():
    names = {0: "background", 1: "kidney", 2: "cyst"}
    label = np.zeros((30, 50), np.uint8)
    label[5:25, 5:45] = 1
    label[12:18, 22:28] = 2  # a 36 px cyst in the middle of an 800 px organ
    for seed in range(8):
        moved, record = apply_lesion_edit(label, (1.0, 1.0), LesionRequest("move", "cyst"), names,
                                          np.random.default_rng(seed))
        distance = np.linalg.norm(centroid(moved == 2) - centroid(label == 2))
        assert distance >= 0.9 * record.achieved_diameter_mm and record.voxel_count == 36


def test_lesion_never_spans_disconnected_parts_of_an_organ():
    """Two parts of one organ label across a one-pixel wall: a lesion that fills most of the big part (inserted or
    regrown) stays in it, even where voxels beyond the wall are nearer its centre than the big part's corners.
    Filling that much, it touches as much wall as organ, so the resize names the organ it goes back to."""
    names = {0: "background", 1: "liver", 2: "wall", 3: "liver_tumour"}
    label = np.zeros((30, 50), np.uint8)
    label[5:25, 5:15] = 1  # 200 px
    label[5:25, 15] = 2
    label[5:25, 16:45] = 1  # 580 px
    for seed in range(8):
        edited, record = apply_lesion_edit(label, (1.0, 1.0), LesionRequest("insert", "liver_tumour", "liver", 560.0,
                                           "mm2"), names, np.random.default_rng(seed))
        resized, _ = apply_lesion_edit(edited, (1.0, 1.0), LesionRequest("resize", "liver_tumour", "liver", 570.0,
                                       "mm2"), names, np.random.default_rng(seed))
        for lesion, count in ((edited == 3, 560), (resized == 3, 570)):
            assert int(lesion.sum()) == count
            assert np.all(label[lesion] == 1) and not lesion[:, :16].any()
            assert ndimage.label(lesion)[1] == 1
        assert record.voxel_count == 560


def test_move_by_an_offset_lands_at_the_target(cases):
    case = cases["ct"]
    liver_value, tumour_value = value_of(case, "liver"), value_of(case, "liver_tumour")
    inserted, _ = edit(case, "liver tumour 25 mm", seed=3)
    depth = ndimage.distance_transform_edt(case.label == liver_value, sampling=case.spacing)
    target = np.array(np.unravel_index(int(np.argmax(depth)), depth.shape))
    start = centroid(inserted == tumour_value)
    offset = tuple(float(v) for v in (target - start) * np.asarray(case.spacing))
    request = LesionRequest("move", "liver_tumour", move_by_mm=offset)
    moved, record = edit(case, request, label=inserted)
    lesion = moved == tumour_value
    assert int(lesion.sum()) == int((inserted == tumour_value).sum())
    assert np.all(np.abs(centroid(lesion) - target) <= 1.0)
    assert np.all(case.label[lesion] == liver_value)
    assert np.all(np.isin(moved, [*np.unique(case.label), tumour_value]))


# ---------------------------------------------------------------------------------------------- remove

@pytest.mark.parametrize(
    ("case_name", "insert", "remove"),
    [
        ("chest", "nodule 12 mm in left lung", "remove nodule"),
        ("ct", "liver tumour 30 mm", "remove tumour"),
        ("brain", "tumour 30 mm", "remove tumour"),
    ],
)
def test_remove_restores_the_organ_exactly(cases, case_name, insert, remove):
    case = cases[case_name]
    inserted, _ = edit(case, insert)
    restored, record = edit(case, remove, label=inserted)
    assert not np.array_equal(inserted, case.label)
    assert np.array_equal(restored, case.label)
    assert record.voxel_count == int((inserted != case.label).sum())


@pytest.mark.parametrize(("case_name", "text", "organ"), [
    ("chest_nodule", "remove nodule", "right_lung"),
    ("ct_tumour", "remove tumour", "liver"),
    ("brain_tumour", "remove tumour", "brain"),
])
def test_remove_gives_a_drawn_lesion_back_to_its_organ(cases, case_name, text, organ):
    case = cases[case_name]
    lesion_value = value_of(case, parse_lesion_request(text, case.label_names).lesion)
    label, record = edit(case, text)
    was_lesion = case.label == lesion_value
    assert not (label == lesion_value).any()
    assert np.all(label[was_lesion] == value_of(case, organ))
    assert np.array_equal(label[~was_lesion], case.label[~was_lesion])
    assert record.organ_labels == (organ,)


def test_remove_at_the_organ_edge_gives_the_voxels_back_to_the_organ_not_the_background():
    names = {0: "background", 1: "kidney", 2: "cyst"}
    label = np.zeros((20, 20), np.uint8)
    label[5:15, 5:15] = 1
    label[5:15, 14] = 2  # a strip along the organ's edge: more background than organ around it
    restored, record = apply_lesion_edit(label, (1.0, 1.0), LesionRequest("remove", "cyst"), names,
                                         np.random.default_rng(0))
    assert np.all(restored[5:15, 5:15] == 1) and record.organ_labels == ("kidney",)


def test_remove_one_component_by_rank(cases):
    case = cases["chest"]
    one, _ = edit(case, "nodule 20 mm in right lung")
    two, _ = edit(case, "nodule 8 mm in left lung", label=one)
    nodule, right = value_of(case, "nodule"), value_of(case, "right_lung")
    largest_gone, _ = edit(case, LesionRequest("remove", "nodule", component=1), label=two)
    assert np.array_equal(largest_gone, np.where(one == nodule, right, two))
    smallest_gone, _ = edit(case, LesionRequest("remove", "nodule", component=2), label=two)
    assert np.array_equal(smallest_gone, one)


# ---------------------------------------------------------------------------------------------- errors

def without_left_lung(case) -> np.ndarray:
    label = case.label.copy()
    label[label == value_of(case, "left_lung")] = 0
    return label


def organ_size_text(case, organ: str) -> str:
    return f"{organ} ({measured_volume(case.label == value_of(case, organ), case.spacing):.4g} "


@pytest.mark.parametrize(
    ("case_name", "request_", "label_edit", "expected"),
    [
        ("chest", LesionRequest("insert", "cyst", "right_lung", 8.0), None, ["unknown lesion label 'cyst'", "right_lung"]),
        ("chest", LesionRequest("insert", "nodule", "liver", 8.0), None, ["unknown organ label 'liver'"]),
        ("chest", "nodule 8 mm in left lung", without_left_lung, ["left_lung is not in this mask", "right_lung"]),
        ("chest", "nodule 300 mm in right lung", None, ["does not fit in", "mm2"]),
        ("brain", "tumour 150 mm", None, ["does not fit in", " ml)"]),
        ("chest", "remove nodule", None, ["no 'nodule' voxels in this mask to remove"]),
        ("ct", "resize tumour to 10 ml", None, ["no 'liver_tumour' voxels in this mask to resize"]),
        ("chest", LesionRequest("insert", "nodule", "right_lung", 1.0, "ml"), None, ["1 ml is a volume", "2D"]),
        ("ct", LesionRequest("insert", "liver_tumour", "liver", 100.0, "mm2"), None, ["100 mm2 is an area", "3D"]),
        ("chest_nodule", LesionRequest("move", "nodule", move_by_mm=(0.0, 300.0)), None, ["outside right_lung"]),
        ("chest_nodule", LesionRequest("remove", "nodule", component=3), None, ["component 3 of 1"]),
    ],
)
def test_edit_errors_are_one_line_user_errors(cases, case_name, request_, label_edit, expected):
    case = cases[case_name]
    label = None if label_edit is None else label_edit(case)
    with pytest.raises(UserInputError) as caught:
        edit(case, request_, label=label)
    message = str(caught.value)
    assert message.startswith("lesions: ") and "\n" not in message
    assert all(fragment in message for fragment in expected), message


@pytest.mark.parametrize(("case_name", "text", "organ"), [
    ("chest", "nodule 300 mm in right lung", "right_lung"),
    ("brain", "tumour 150 mm", "brain"),
])
def test_too_large_a_lesion_names_the_organ_size(cases, case_name, text, organ):
    with pytest.raises(UserInputError, match="does not fit") as caught:
        edit(cases[case_name], text)
    assert organ_size_text(cases[case_name], organ) in str(caught.value)


def test_move_and_resize_refuse_to_guess_between_two_lesions(cases):
    case = cases["chest"]
    one, _ = edit(case, "nodule 20 mm in right lung")
    two, _ = edit(case, "nodule 8 mm in left lung", label=one)
    for text in ("resize nodule to 10 mm", "move nodule"):
        with pytest.raises(UserInputError, match="2 separate 'nodule' lesions.*component to 1..2"):
            edit(case, text, label=two)
    nodule, left = value_of(case, "nodule"), value_of(case, "left_lung")
    resized, record = edit(case, LesionRequest("resize", "nodule", size=10.0, component=2), label=two)
    assert record.organ_labels == ("left_lung",)
    in_left = case.label == left
    assert np.array_equal((resized == nodule) & ~in_left, one == nodule)
    assert measured_volume((resized == nodule) & in_left, case.spacing) == pytest.approx(ball_volume(10.0, 2), rel=0.10)


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        (dict(action="explode", lesion="nodule"), "unknown action 'explode'"),
        (dict(action="insert", lesion="nodule", size=8.0, side="north"), "unknown side 'north'"),
        (dict(action="insert", lesion="nodule", size=8.0, level="top"), "unknown level 'top'"),
        (dict(action="insert", lesion="nodule", size=8.0, size_unit="inch"), "unknown size unit 'inch'"),
        (dict(action="insert", lesion="nodule", size=(8.0, 4.0)), "runs backwards"),
        (dict(action="insert", lesion="nodule", size=8.0, irregularity=1.0), "irregularity 1.0"),
        (dict(action="remove", lesion="nodule", component=0), "component 0"),
        (dict(action="insert", lesion="nodule", size=8.0, move_by_mm=(1.0, 1.0)), "move_by_mm given to insert"),
    ],
)
def test_request_fields_are_checked(fields, problem):
    with pytest.raises(UserInputError, match="^lesions: ") as caught:
        LesionRequest(**fields)
    assert problem in str(caught.value)


# ------------------------------------------------------------------------------------ orientation, record

def test_default_orientations_match_the_phantoms(cases):
    for kind, (lr_axis, cc_axis, right_low, superior_low) in PHANTOM_AXES.items():
        ndim = len(GRIDS[kind])
        assert default_orientation(ndim) == Orientation(lr_axis, cc_axis, right_low, superior_low)
    chest, ct, brain = cases["chest"], cases["ct"], cases["brain_tumour"]
    # Radiographic display: patient right on the image's left, apex (superior) above the heart.
    assert centroid(chest.label == 1)[1] < centroid(chest.label == 2)[1]
    assert centroid(np.isin(chest.label, [1, 2]))[0] < centroid(chest.label == 3)[0]
    # CT (RAS): right lung and liver at high i, spleen at low i, lungs above (higher k than) the liver.
    assert centroid(ct.label == 2)[0] > centroid(ct.label == 3)[0]
    assert centroid(ct.label == 4)[0] > centroid(ct.label == 5)[0]
    assert centroid(np.isin(ct.label, [2, 3]))[2] > centroid(ct.label == 4)[2]
    # MRI (RAS): a tumour sampled on the right lies at high i.
    assert brain.attributes["side"] == "right"
    assert centroid(brain.label == 3)[0] > centroid(np.isin(brain.label, [1, 3]))[0]


@pytest.mark.parametrize(
    ("affine", "expected"),
    [
        (np.diag([2.0, 2.0, 3.0, 1.0]), Orientation(0, 2, False, False)),
        (np.diag([-2.0, 2.0, 3.0, 1.0]), Orientation(0, 2, True, False)),
        (np.diag([1.0, 1.0, -1.0, 1.0]), Orientation(0, 2, False, True)),
        # axis 0 runs to Superior, axis 1 to Left, axis 2 to Anterior
        (np.array([[0, -1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float), Orientation(1, 0, True, False)),
    ],
)
def test_orientation_from_affine(affine, expected):
    assert orientation_from_affine(affine) == expected


def test_orientation_from_affine_rejects_a_raster_affine():
    with pytest.raises(ValueError, match="no left-right or cranio-caudal axis"):
        orientation_from_affine(np.diag([0.5, 0.5, 1.0]))


def test_an_affine_derived_orientation_finds_the_same_side_on_a_flipped_array(cases):
    """The (RAS) phantom flipped to LAS (right at low i, as many scanners store it): the affine tells the edit where
    left now is."""
    case = cases["brain"]
    flipped = np.flip(case.label, axis=0).copy()
    orientation = orientation_from_affine(np.diag([-case.spacing[0], *case.spacing[1:], 1.0]))
    request = parse_lesion_request("left upper tumour 30 mm", case.label_names)
    edited, _ = apply_lesion_edit(flipped, case.spacing, request, case.label_names, np.random.default_rng(0),
                                  orientation)
    lesion = np.flip(edited, axis=0) == value_of(case, "tumour")
    assert side_of_point(centroid(lesion), case.label == value_of(case, "brain"), "brain_mri") == "left"
    assert third_of(case.label == value_of(case, "brain"), centroid(lesion), "brain_mri") == "upper"


def test_record_is_json_ready(cases):
    _, record = edit(cases["ct"], "liver tumour 20-40 mm")
    payload = json.loads(json.dumps(record.to_dict()))
    assert payload["action"] == "insert" and payload["lesion_label"] == "liver_tumour"
    assert payload["organ_labels"] == ["liver"] and payload["volume_unit"] == "ml"
    assert payload["centre_mm"] == pytest.approx([i * s for i, s in zip(payload["centre_voxel"], cases["ct"].spacing)])
    assert 20.0 <= payload["drawn_size"] <= 40.0
    assert payload["requested_diameter_mm"] == pytest.approx(payload["drawn_size"])

"""Conditioning adherence: mask-Dice ratio, label volumes, intensity plausibility and attribute adherence.

Known answers: real images with their own masks score a mask-Dice ratio of about 1 and collapse when the
masks are shuffled; exact masks give zero volume error; CT shifted by +200 HU fails the intensity check while
unshifted real CT passes (2D and 3D); true attributes score like real data and shuffled ones at chance.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from radsynth.pipelines.data.phantoms import generate_cohort
from radsynth.pipelines.data.preprocess import IntensityMap
from radsynth.pipelines.scoring.adherence import (
    attribute_adherence,
    intensity_plausibility,
    label_volumes,
    mask_dice_ratio,
    per_sample_medians,
    real_range,
    segment,
    volume_agreement,
)
from radsynth.pipelines.scoring.attribute_classifier import AttributeClassifier
from radsynth.pipelines.scoring.image_sets import ConcatenatedRows, ImageSet, image_array
from radsynth.pipelines.scoring.segmenter import Segmenter, per_label_dice

SHAPE_LABELS = (1, 2)  # 1 = bright disc, 2 = dark square
TINY = (8, 16, 32)


def shapes_set(n: int, seed: int, size: int = 32, synthetic: bool = False, name: str = "") -> ImageSet:
    """Images of a bright disc (label 1) and, in about half, a dark square (label 2) at random places, on a
    striped background.

    Objects move freely, so a mask paired with the wrong image barely overlaps it; ``finding`` says whether the
    square is there, ``stripes`` which way the background runs (an image-wide attribute, like a radiograph's
    view, that a tiny classifier learns in a few steps). Two images per patient, so the patient bootstrap has
    something to group.
    """
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(np.arange(size), np.arange(size), indexing="ij")).astype(np.float32)
    images, masks, conditions = np.zeros((n, size, size), np.float32), np.zeros((n, size, size), np.int64), []
    for i in range(n):
        label = (((grid - rng.uniform(7, size - 7, 2)[:, None, None]) ** 2).sum(0) < rng.uniform(3.5, 6.5) ** 2)
        label = label.astype(np.int64)
        has_square = bool(rng.random() < 0.5)
        for _ in range(50 if has_square else 0):
            side = int(rng.integers(5, 10))
            top, left = rng.integers(1, size - side - 1, 2)
            if not label[top:top + side, left:left + side].any():
                label[top:top + side, left:left + side] = 2
                break
        stripes = "horizontal" if rng.random() < 0.5 else "vertical"
        background = -0.2 + 0.15 * np.sin(grid[0 if stripes == "horizontal" else 1] / rng.uniform(1.0, 2.5))
        image = background + 0.7 * (label == 1) - 0.6 * (label == 2) + rng.normal(0, 0.1, label.shape)
        images[i], masks[i] = np.clip(image, -1, 1), label
        conditions.append({"finding": "square" if (label == 2).any() else "none", "stripes": stripes})
    ids = [f"{name or 'shape'}{seed}_{i:03d}" for i in range(n)]
    groups = ids if synthetic else [f"patient{seed}_{i // 2}" for i in range(n)]
    return ImageSet(images, ids, groups, (1.0, 1.0), IntensityMap("none", 0.0, 1.0), synthetic, masks, conditions,
                    name=name)


def ct_sets(n: int, seed: int, shape: tuple[int, ...] = (16, 16, 16)) -> tuple[np.ndarray, np.ndarray, list, tuple]:
    """CT torso phantoms in HU with their label maps, patient ids and spacing."""
    cases = list(generate_cohort("ct_torso", n, seed, shape=shape))
    return (np.stack([c.image for c in cases]), np.stack([c.label for c in cases]).astype(np.int64),
            [f"{seed}_{c.patient_id}" for c in cases], cases[0].spacing)


def ct_image_set(hu: np.ndarray, masks: np.ndarray, groups: list, spacing: tuple, synthetic: bool) -> ImageSet:
    """As a user's files would arrive: HU mapped through the CT window onto [-1, 1] (clipping outside)."""
    window = IntensityMap("ct_window", -1000.0, 1000.0)
    ids = [f"s{i}" for i in range(len(hu))]
    return ImageSet(window.forward(hu), ids, ids if synthetic else groups, spacing, window, synthetic, masks)


@pytest.fixture(scope="module")
def shapes_segmenter() -> Segmenter:
    torch.manual_seed(0)
    train = shapes_set(48, seed=0)
    return Segmenter(2, 3, channels=TINY, seed=0).fit(train.images, train.masks, steps=300, batch_size=8,
                                                       learning_rate=3e-3)


def test_per_label_dice_known_values():
    target = np.zeros((1, 6, 6), np.int64)
    predicted = np.zeros((1, 6, 6), np.int64)
    target[0, 0:2, 0:3] = 1  # 6 pixels
    predicted[0, 0:2, 0:2] = 1  # 4 pixels, all inside the target
    predicted[0, 5, 5] = 3  # label 3 predicted but absent from the target
    dice = per_label_dice(predicted, target, [1, 2, 3])
    assert dice.shape == (1, 3)
    assert dice[0, 0] == pytest.approx(2 * 4 / (4 + 6))
    assert np.isnan(dice[0, 1])  # absent from both: nothing to score
    assert dice[0, 2] == 0.0


def test_segmenter_is_deterministic_batch_independent_and_takes_any_grid():
    data = shapes_set(8, seed=3, size=30)  # 30 is not a multiple of 4: padded inside
    first = Segmenter(2, 3, channels=TINY, seed=1).fit(data.images, data.masks, steps=5, batch_size=4)
    second = Segmenter(2, 3, channels=TINY, seed=1).fit(data.images, data.masks, steps=5, batch_size=4)
    other = Segmenter(2, 3, channels=TINY, seed=2).fit(data.images, data.masks, steps=5, batch_size=4)
    together = first.predict(data.images, batch_size=8)
    assert together.shape == data.images.shape and together.dtype == np.int64
    np.testing.assert_array_equal(together, second.predict(data.images))
    np.testing.assert_array_equal(together, np.concatenate([first.predict(data.images[i:i + 1], batch_size=1)
                                                            for i in range(len(data))]))
    first_weights = next(first.network.parameters()).detach()
    assert not torch.equal(first_weights, next(other.network.parameters()).detach())


def test_models_trained_on_concatenated_rows_of_a_set_on_disk_equal_those_trained_on_one_array(tmp_path):
    real, synthetic = shapes_set(6, seed=3, size=30), shapes_set(10, seed=4, size=30, synthetic=True)
    images = image_array(len(synthetic), synthetic.images.shape[1:], np.float32, on_disk_in=tmp_path)
    masks = image_array(len(synthetic), synthetic.masks.shape[1:], np.int64, on_disk_in=tmp_path)
    images[:], masks[:] = synthetic.images, synthetic.masks
    stacked = ConcatenatedRows(real.images, images)
    np.testing.assert_array_equal(stacked[np.array([7, 0, 15, 6])],
                                  np.concatenate([real.images, synthetic.images])[[7, 0, 15, 6]])
    np.testing.assert_array_equal(stacked[4:9], np.concatenate([real.images, synthetic.images])[4:9])
    with pytest.raises(IndexError):
        stacked[np.array([16])]

    def segmenter(x, y):
        return Segmenter(2, 3, channels=TINY, seed=1).fit(x, y, steps=4, batch_size=4)

    joined = segmenter(np.concatenate([real.images, synthetic.images]), np.concatenate([real.masks, synthetic.masks]))
    streamed = segmenter(stacked, ConcatenatedRows(real.masks, masks))
    for a, b in zip(joined.network.parameters(), streamed.network.parameters()):
        assert torch.equal(a, b)

    labels = [c["finding"] for c in real.conditions + synthetic.conditions]
    classes = sorted(set(labels))
    joined = AttributeClassifier((30, 30), classes, channels=(4, 8), seed=1).fit(
        torch.from_numpy(np.concatenate([real.images, synthetic.images]))[:, None], labels, steps=4, batch_size=4)
    streamed = AttributeClassifier((30, 30), classes, channels=(4, 8), seed=1).fit(stacked, labels, steps=4,
                                                                                   batch_size=4)
    for a, b in zip(joined.network.parameters(), streamed.network.parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(next(joined.network.parameters()),
                           next(AttributeClassifier((30, 30), classes, channels=(4, 8), seed=2).network.parameters()))


def test_segmenter_refuses_labels_outside_its_classes_wherever_they_lie():
    images = np.zeros((70, 8, 8), np.float32)
    masks = np.zeros((70, 8, 8), np.int64)
    masks[68, 0, 0] = 3  # in the second batch of rows the range is read in
    with pytest.raises(ValueError, match=r"0\.\.2, found 0\.\.3"):
        Segmenter(2, 3, channels=TINY).fit(images, masks, steps=1)
    masks[68, 0, 0] = -1
    with pytest.raises(ValueError, match=r"found -1\.\.0"):
        Segmenter(2, 3, channels=TINY).fit(images, masks, steps=1)


def test_segmenter_runs_in_3d():
    volumes = np.random.default_rng(0).uniform(-1, 1, (2, 12, 12, 12)).astype(np.float32)
    masks = (volumes > 0.5).astype(np.int64)
    predicted = Segmenter(3, 2, channels=(4, 8), seed=0).fit(volumes, masks, steps=2, batch_size=2).predict(volumes)
    assert predicted.shape == volumes.shape


@pytest.mark.slow
def test_mask_dice_ratio_is_about_one_for_real_pairs_and_collapses_for_shuffled_pairs(shapes_segmenter):
    real_test = shapes_set(32, seed=1)
    as_synthetic = shapes_set(32, seed=2, synthetic=True, name="synthetic")
    result = mask_dice_ratio(shapes_segmenter, as_synthetic, real_test, SHAPE_LABELS, n_boot=100, seed=0)
    ratio = result["mean"]["ratio"]
    assert result["mean"]["real_dice"].value > 0.7  # the judge works on real data
    assert abs(ratio.value - 1.0) < 0.1 or ratio.ci_low <= 1.0 <= ratio.ci_high, ratio
    assert ratio.ci_low <= ratio.value <= ratio.ci_high
    assert set(result["per_label"]) == {"1", "2"}
    assert len(result["per_sample"]) == 32 and result["per_sample"][0]["id"] == as_synthetic.ids[0]

    # Each image paired with another image's mask (a derangement: no image keeps its own).
    shuffled_masks = np.roll(as_synthetic.masks, 1, axis=0)
    shuffled = ImageSet(as_synthetic.images, as_synthetic.ids, as_synthetic.groups, as_synthetic.spacing,
                        as_synthetic.intensity, True, shuffled_masks)
    collapsed = mask_dice_ratio(shapes_segmenter, shuffled, real_test, SHAPE_LABELS, n_boot=100, seed=0)
    assert collapsed["mean"]["ratio"].value < 0.5, collapsed["mean"]["ratio"]
    assert collapsed["mean"]["ratio"].ci_high < ratio.ci_low
    # The real ceiling does not depend on the synthetic set.
    assert collapsed["mean"]["real_dice"].value == result["mean"]["real_dice"].value


def test_label_volume_known_units_and_exact_masks_give_zero_error():
    plane = np.zeros((1, 8, 8), np.int64)
    plane[0, :2, :5] = 1  # 10 pixels of 2 x 3 mm = 60 mm^2 = 0.6 cm^2
    assert label_volumes(plane, (2.0, 3.0), [1])[0, 0] == pytest.approx(0.6)
    volume = np.zeros((1, 4, 4, 4), np.int64)
    volume[0, :2, :5, :1] = 2  # 8 voxels of 1 x 2 x 5 mm = 80 mm^3 = 0.08 ml
    assert label_volumes(volume, (1.0, 2.0, 5.0), [2])[0, 0] == pytest.approx(0.08)

    masks = shapes_set(12, seed=4).masks
    volumes = label_volumes(masks, (1.0, 1.0), SHAPE_LABELS)
    exact = volume_agreement(volumes, volumes, SHAPE_LABELS, 2, real_predicted_volumes=volumes,
                             real_truth_volumes=volumes)
    assert exact["unit"] == "cm2"
    for label in ("1", "2"):
        assert exact["per_label"][label]["median_relative_error"] == 0.0
        assert exact["per_label"][label]["median_absolute_relative_error"] == 0.0
        assert exact["per_label"][label]["pearson"] == pytest.approx(1.0)
        assert exact["reference"][label]["median_relative_error"] == 0.0
    grown = np.where((masks == 0) & (np.roll(masks, 1, axis=2) == 1), 1, masks)  # disc one pixel wider
    grown_error = volume_agreement(label_volumes(grown, (1.0, 1.0), [1]), label_volumes(masks, (1.0, 1.0), [1]), [1],
                                   2)["per_label"]["1"]["median_relative_error"]
    assert grown_error > 0.05


def test_segment_reads_a_set_in_batches_exactly_as_one_pass_over_it(shapes_segmenter):
    data = shapes_set(70, seed=5)  # more images than one batch
    segmented = segment(shapes_segmenter, data, SHAPE_LABELS, spacing=(2.0, 1.0))
    predicted = shapes_segmenter.predict(data.images)
    np.testing.assert_array_equal(segmented.dice, per_label_dice(predicted, data.masks, SHAPE_LABELS))
    np.testing.assert_array_equal(segmented.predicted_volumes, label_volumes(predicted, (2.0, 1.0), SHAPE_LABELS))
    np.testing.assert_array_equal(segmented.mask_volumes, label_volumes(data.masks, (2.0, 1.0), SHAPE_LABELS))
    assert np.isfinite(segmented.dice[:, 0]).all() and (segmented.mask_volumes[:, 0] > 0).all()


CT_LABELS = (1, 2, 3, 4, 5, 8)  # body, lungs, liver, spleen, vertebrae


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_intensity_plausibility_fails_ct_shifted_by_200_hu_and_passes_real_ct(spatial_dims):
    train_hu, train_masks, train_groups, spacing = ct_sets(40, seed=0)
    test_hu, test_masks, test_groups, _ = ct_sets(24, seed=1)
    if spatial_dims == 2:  # an axial slice through liver, spleen and spine (axis 2 runs inferior -> superior)
        train_hu, train_masks, test_hu, test_masks = (a[..., a.shape[-1] // 3] for a in
                                                      (train_hu, train_masks, test_hu, test_masks))
        spacing = spacing[:2]
    real = ct_image_set(train_hu, train_masks, train_groups, spacing, synthetic=False)
    unshifted = ct_image_set(test_hu, test_masks, test_groups, spacing, synthetic=True)
    shifted = ct_image_set(test_hu + 200.0, test_masks, test_groups, spacing, synthetic=True)

    passed = intensity_plausibility(unshifted, real, CT_LABELS, n_boot=100)
    failed = intensity_plausibility(shifted, real, CT_LABELS, n_boot=100)
    assert passed["unit"] == "HU"
    assert passed["passed"] is True, passed["reasons"]
    assert failed["passed"] is False
    # Soft-tissue organs are well inside the window: their medians move by the full 200 HU and all leave the range.
    liver = failed["per_label"]["4"]
    assert liver["synthetic_median_of_medians"] - passed["per_label"]["4"]["synthetic_median_of_medians"] == \
        pytest.approx(200.0, abs=1.0)
    assert liver["share_inside"].value == 0.0 and liver["share_inside"].ci_high == 0.0 and liver["passed"] is False
    assert failed["share_flagged"] > 0.9 and passed["share_flagged"] < 0.3
    assert passed["reasons"] == [] and any(reason.startswith("region 4:") for reason in failed["reasons"])
    assert failed["per_sample_outside"] == [row["intensity_flag"] for row in failed["per_sample"]]
    liver_medians = per_sample_medians(real, CT_LABELS)[:, 3]
    # 40 real images: the order statistics nearest p0.5 and p99.5 are the minimum and maximum.
    assert passed["per_label"]["4"]["real_range"] == [np.nanmin(liver_medians), np.nanmax(liver_medians)]
    # Without masks the foreground median is judged, and the shift still fails it.
    assert intensity_plausibility(shifted, real, None, n_boot=50)["passed"] is False
    assert intensity_plausibility(unshifted, real, None, n_boot=50)["passed"] is True


def test_real_range_uses_order_statistics_with_known_coverage():
    values = np.arange(1.0, 1000.0)  # N = 999: k = floor(0.005 * 1000) = 5
    assert real_range(values) == (5.0, 995.0, 5)
    assert real_range(np.array([3.0, np.nan, 1.0, 2.0])) == (1.0, 3.0, 1)  # small N: [min, max]
    assert np.isnan(real_range(np.array([1.0]))[0])


def test_intensity_plausibility_rarely_fails_real_against_real():
    hu, masks, groups, spacing = ct_sets(150, seed=7)
    hu, masks, spacing = hu[..., 5], masks[..., 5], spacing[:2]
    patients = np.unique(groups)
    rng = np.random.default_rng(0)
    failures = 0
    for _ in range(10):
        chosen = set(rng.permutation(patients)[: len(patients) // 2])
        first = [i for i, g in enumerate(groups) if g in chosen]
        second = [i for i, g in enumerate(groups) if g not in chosen]
        real = ct_image_set(hu[first], masks[first], [groups[i] for i in first], spacing, synthetic=False)
        other = ct_image_set(hu[second], masks[second], [groups[i] for i in second], spacing, synthetic=True)
        failures += intensity_plausibility(other, real, CT_LABELS, n_boot=10)["passed"] is False
    assert failures <= 1


def test_attribute_adherence_true_conditions_match_real_and_ignored_prompts_fall_to_chance():
    train = shapes_set(64, seed=0)
    classifier = AttributeClassifier([32, 32], ["horizontal", "vertical"], channels=TINY, seed=0)
    classifier.fit(torch.from_numpy(train.images)[:, None], [c["stripes"] for c in train.conditions], steps=150,
                   batch_size=16, learning_rate=2e-3)
    real_test = shapes_set(40, seed=1)
    honest = shapes_set(48, seed=2, synthetic=True)
    result = attribute_adherence(classifier, honest, real_test, "stripes", n_boot=100)
    ratio = result["ratio"]
    assert result["real_balanced_accuracy"].value > 0.85
    assert abs(ratio.value - 1.0) < 0.1 or ratio.ci_low <= 1.0 <= ratio.ci_high, ratio
    assert result["chance"] == 0.5 and set(result["per_value"]) == {"horizontal", "vertical"}
    assert len(result["per_sample"]) == 48 and result["n_unscored"] == 0

    # The generator ignored the prompt: within each true stripe direction, half the samples were prompted with
    # each value, so the prompt carries no information about the image.
    truth = [c["stripes"] for c in honest.conditions]
    prompts = list(truth)
    for value in ("horizontal", "vertical"):
        for k, i in enumerate(i for i, t in enumerate(truth) if t == value):
            prompts[i] = ("horizontal", "vertical")[k % 2]
    ignored = ImageSet(honest.images, honest.ids, honest.groups, honest.spacing, honest.intensity, True, honest.masks,
                       [{"stripes": p} for p in prompts])
    blind = attribute_adherence(classifier, ignored, real_test, "stripes", n_boot=100)
    assert abs(blind["synthetic_balanced_accuracy"].value - 0.5) < 0.1
    assert blind["ratio"].value < ratio.value - 0.25
    assert blind["ratio"].ci_low <= blind["chance_ratio"] <= blind["ratio"].ci_high

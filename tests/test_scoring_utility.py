"""Downstream utility: AUC known answers, train-on-synthetic-test-on-real and augmentation gain.

Known answers: an independent draw from the real distribution, used as synthetic data, trains models as good
as real data; noise with unrelated masks or labels trains models that fail on real test images; more real
data helps a data-starved model, and adding good synthetic data helps it most where real data are scarce.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from radsynth.pipelines.scoring.image_sets import ImageSet
from radsynth.pipelines.scoring.roc import macro_auc, mann_whitney_auc
from radsynth.pipelines.scoring.utility import (
    TrainingPlan,
    augmentation_gain,
    patient_subsample,
    train_on_synthetic_test_on_real,
)

from .test_scoring_adherence import shapes_set

TINY = (8, 16, 32)


def noise_like(reference: ImageSet, seed: int) -> ImageSet:
    """Pure noise images with masks and stripe labels from an unrelated draw: a generator that learnt nothing."""
    rng = np.random.default_rng(seed)
    unrelated = shapes_set(len(reference), seed=seed + 100, synthetic=True)
    conditions = [{"stripes": str(v)} for v in rng.choice(["horizontal", "vertical"], len(reference))]
    return ImageSet(rng.uniform(-1, 1, reference.images.shape).astype(np.float32), unrelated.ids, unrelated.groups,
                    reference.spacing, reference.intensity, True, unrelated.masks, conditions)


def test_mann_whitney_auc_known_values_and_brute_force():
    assert mann_whitney_auc(np.array([0.8, 0.9]), np.array([0.1, 0.2])) == 1.0
    assert mann_whitney_auc(np.array([0.2, 0.1]), np.array([0.9, 0.8])) == 0.0
    assert mann_whitney_auc(np.ones(3), np.ones(3)) == 0.5  # ties count half
    assert np.isnan(macro_auc(np.array([[0.3, 0.7], [0.4, 0.6]]), np.array([1, 1])))  # no negatives: undefined

    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 40).astype(float)  # many ties
    positive = rng.random(40) < 0.4
    pairs = [(p, n) for p, n in itertools.product(scores[positive], scores[~positive])]
    brute = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs])
    assert mann_whitney_auc(scores[positive], scores[~positive]) == pytest.approx(brute)

    probabilities = rng.dirichlet(np.ones(3), size=30)
    truth = rng.integers(0, 3, 30)
    expected = np.mean([mann_whitney_auc(probabilities[truth == k, k], probabilities[truth != k, k]) for k in range(3)])
    assert macro_auc(probabilities, truth) == pytest.approx(expected)
    assert macro_auc(np.eye(3)[truth], truth) == 1.0


def test_patient_subsample_is_nested_whole_patients_and_seeded():
    groups = [f"p{i // 3}" for i in range(60)]  # 20 patients, 3 images each
    small, medium, full = (patient_subsample(groups, f, seed=4) for f in (0.1, 0.25, 1.0))
    assert len(small) == 6 and len(medium) == 15 and len(full) == 60  # 2, 5, 20 patients
    assert set(small) <= set(medium) <= set(full)
    for rows in (small, medium):
        patients = {groups[i] for i in rows}
        assert len(rows) == 3 * len(patients)  # every image of a chosen patient
    np.testing.assert_array_equal(small, patient_subsample(groups, 0.1, seed=4))
    assert not np.array_equal(small, patient_subsample(groups, 0.1, seed=5))
    assert len(patient_subsample(groups, 0.01, seed=0)) == 3  # at least one patient


@pytest.mark.slow
def test_tstr_matches_trtr_for_real_like_synthetic_and_falls_for_noise():
    real_train, real_test = shapes_set(48, seed=0), shapes_set(32, seed=1)
    like_real = shapes_set(48, seed=5, synthetic=True)  # an independent draw of the same distribution
    segmentation = TrainingPlan(channels=TINY, steps=120, batch_size=8, learning_rate=3e-3)
    classification = TrainingPlan(channels=TINY, steps=60, batch_size=16, learning_rate=3e-3)
    options = {"labels": (1, 2), "attribute": "stripes", "segmentation_plan": segmentation,
               "classification_plan": classification, "n_boot": 100}

    good = train_on_synthetic_test_on_real(like_real, real_train, real_test, **options)
    bad = train_on_synthetic_test_on_real(noise_like(like_real, seed=9), real_train, real_test, **options)

    dice, disc, auc = good["segmentation"]["mean"], good["segmentation"]["per_label"]["1"], good["classification"]
    assert disc["real"].value > 0.8 and auc["real"].value > 0.9  # the reference models learnt something
    # The disc is learnt within these few steps whatever the seed; the square is learnt late and unevenly (a
    # training-noise effect the test-patient bootstrap does not hold), so the mean gets a looser bound.
    for result in (disc, auc):
        difference = result["difference"]
        assert abs(difference.value) < 0.05 or difference.ci_low <= 0.0 <= difference.ci_high, difference
        assert difference.value == pytest.approx(result["synthetic"].value - result["real"].value)
    assert abs(dice["difference"].value) < 0.15
    assert set(good["segmentation"]["per_label"]) == {"1", "2"}

    noisy_dice, noisy_auc = bad["segmentation"]["mean"], bad["classification"]
    assert noisy_dice["synthetic"].value < dice["real"].value - 0.3 and noisy_dice["difference"].ci_high < 0
    assert noisy_auc["synthetic"].value < 0.75 and noisy_auc["difference"].ci_high < 0
    # The real arm is the same model in both runs: training is seeded.
    assert noisy_dice["real"].value == dice["real"].value


@pytest.mark.slow
def test_augmentation_gain_real_data_help_and_good_synthetic_data_help_most_when_real_is_scarce():
    real_train, real_test = shapes_set(48, seed=0), shapes_set(32, seed=1)
    like_real = shapes_set(48, seed=5, synthetic=True)
    plan = TrainingPlan(channels=(4, 8, 16), steps=40, batch_size=8, learning_rate=3e-3)
    result = augmentation_gain(real_train, like_real, real_test, fractions=(0.1, 0.25, 1.0), seeds=(0, 1, 2),
                               task="classification", attribute="stripes", plan=plan, n_boot=100)
    assert result["metric"] == "auc" and [row["fraction"] for row in result["fractions"]] == [0.1, 0.25, 1.0]
    for row in result["fractions"]:
        assert [s["seed"] for s in row["per_seed"]] == [0, 1, 2]
        for arm in ("real_only", "augmented", "gain"):
            assert row[arm].ci_low <= row[arm].value <= row[arm].ci_high and row[arm].n_boot > 0
        mean_gain = np.mean([s["augmented"] - s["real_only"] for s in row["per_seed"]])
        assert row["gain"].value == pytest.approx(mean_gain)
    small, _, full = result["fractions"]
    assert small["n_real_images"] < full["n_real_images"] == len(real_train)
    assert full["real_only"].value > small["real_only"].value + 0.1
    assert small["gain"].ci_low > 0  # 4 real images + 48 good synthetic ones beat 4 real images


def test_augmentation_gain_segmentation_runs_and_pools_synthetic_pairs():
    real_train, real_test = shapes_set(16, seed=0), shapes_set(8, seed=1)
    noise = noise_like(shapes_set(16, seed=5, synthetic=True), seed=3)
    plan = TrainingPlan(channels=(4, 8), steps=4, batch_size=4)
    result = augmentation_gain(real_train, noise, real_test, fractions=(0.5, 1.0), seeds=(0,), task="segmentation",
                               labels=(1, 2), plan=plan, n_boot=20)
    assert result["metric"] == "dice" and len(result["fractions"]) == 2
    half = result["fractions"][0]
    assert half["n_real_images"] == 8 and half["per_seed"][0]["n_real_patients"] == 4
    # Adding 16 noise pairs changes what the model learns, so the arms differ.
    assert half["per_seed"][0]["real_only"] != half["per_seed"][0]["augmented"]
    with pytest.raises(ValueError, match="labels"):
        augmentation_gain(real_train, noise, real_test, task="segmentation")

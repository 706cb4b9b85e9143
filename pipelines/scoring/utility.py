"""Downstream utility: is the synthetic data worth training on?

Two measurements, both scored on the *real* test split only:
- train-on-synthetic-test-on-real (TSTR) against train-on-real (TRTR): the same model, trained the same way
  once on synthetic pairs and once on the real training split (segmentation Dice per label; classification
  one-vs-rest macro AUC of an attribute);
- augmentation gain: real data alone against real + synthetic, at several fractions of the real data
  (subsampled by patient) and several seeds; synthetic data matter most where real data are scarce.
Both arms score the same test images, so differences get a *paired* bootstrap over test patients: every
replicate draws one set of patients and scores both arms on it. The CIs hold the test-set sampling noise;
training noise enters through the seeds (averaged in augmentation gain).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from .attribute_classifier import AttributeClassifier
from .bootstrap import Estimate, bootstrap
from .image_sets import ConcatenatedRows, ImageSet
from .real_side import RealSideCache, rows_digest
from .roc import macro_auc
from .segmenter import Segmenter, per_label_dice

__all__ = [
    "TrainingPlan",
    "augmentation_gain",
    "patient_subsample",
    "train_on_synthetic_test_on_real",
    "tstr_classification",
    "tstr_segmentation",
]


@dataclass(frozen=True)
class TrainingPlan:
    """How each utility model is trained; both arms of a comparison use the same plan and seed."""

    channels: tuple[int, ...] = (16, 32, 64, 128)
    steps: int = 300
    batch_size: int = 16
    learning_rate: float = 1e-3


# ------------------------------------------------------------------------------------------------------ metrics


def _macro_dice(dice: np.ndarray, rows: np.ndarray) -> float:
    """Mean over labels of the mean Dice over the given test images (labels absent everywhere are skipped)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(np.nanmean(dice[rows], axis=0)))


def _label_mean(dice: np.ndarray, j: int) -> Callable[[np.ndarray], float]:
    def mean(rows: np.ndarray) -> float:
        column = dice[rows, j]
        return float(np.mean(column[np.isfinite(column)])) if np.isfinite(column).any() else math.nan
    return mean


def _paired(real_metric: Callable[[np.ndarray], float], synthetic_metric: Callable[[np.ndarray], float],
            groups: Sequence[str], n_boot: int, seed: int) -> dict[str, Estimate]:
    """Both arms and their difference (synthetic - real), bootstrapped on the same test-patient draws."""
    return {
        "synthetic": bootstrap(synthetic_metric, [groups], n_boot, seed),
        "real": bootstrap(real_metric, [groups], n_boot, seed),
        "difference": bootstrap(lambda rows: synthetic_metric(rows) - real_metric(rows), [groups], n_boot, seed),
    }


# ----------------------------------------------------------------------------------------------------- training


def _num_classes(labels: Sequence[int], *sets: ImageSet) -> int:
    return int(max([max(labels)] + [int(s.masks.max()) for s in sets if s.masks is not None and len(s)])) + 1


def _train_segmenter(images: np.ndarray | ConcatenatedRows, masks: np.ndarray | ConcatenatedRows, num_classes: int,
                     plan: TrainingPlan, seed: int) -> Segmenter:
    segmenter = Segmenter(len(images.shape) - 1, num_classes, channels=plan.channels, seed=seed)
    return segmenter.fit(images, masks, steps=plan.steps, batch_size=plan.batch_size,
                         learning_rate=plan.learning_rate)


def _attribute_labels(image_set: ImageSet, attribute: str) -> list[str]:
    values = [condition.get(attribute) for condition in image_set.conditions]
    if any(v is None for v in values):
        missing = sum(v is None for v in values)
        raise ValueError(f"{image_set.name or 'image set'}: {missing} images have no '{attribute}' attribute")
    return [str(v) for v in values]


def _train_classifier(images: np.ndarray | ConcatenatedRows, labels: Sequence[str], classes: Sequence[str],
                      plan: TrainingPlan, seed: int) -> AttributeClassifier:
    classifier = AttributeClassifier(images.shape[1:], classes, channels=plan.channels, seed=seed)
    return classifier.fit(images, labels, steps=plan.steps, batch_size=plan.batch_size,
                          learning_rate=plan.learning_rate)


def _as_channels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))[:, None]


def _require_masks(image_set: ImageSet, role: str) -> np.ndarray:
    if image_set.masks is None:
        raise ValueError(f"{image_set.name or role}: segmentation utility needs label masks, but the set has none")
    return image_set.masks


# ------------------------------------------------------------------------------------------------------- TSTR


def tstr_segmentation(synthetic: ImageSet, real_train: ImageSet, real_test: ImageSet, labels: Sequence[int],
                      plan: TrainingPlan = TrainingPlan(), seed: int = 0, n_boot: int = 200,
                      label_names: Mapping[int, str] | None = None, cache: RealSideCache | None = None) -> dict:
    """Per-label Dice on real test of a UNet trained on synthetic pairs vs one trained on real train pairs."""
    dice = _tstr_arms("segmentation", synthetic, real_train, real_test, labels, None, plan, seed, cache)
    names = [str(label_names.get(label, label)) if label_names else str(label) for label in labels]
    per_label = {name: _paired(_label_mean(dice["real"], j), _label_mean(dice["synthetic"], j), real_test.groups,
                               n_boot, seed) for j, name in enumerate(names)}
    mean = _paired(lambda rows: _macro_dice(dice["real"], rows), lambda rows: _macro_dice(dice["synthetic"], rows),
                   real_test.groups, n_boot, seed)
    return {"metric": "dice", "labels": names, "per_label": per_label, "mean": mean, "n_test": len(real_test),
            "n_synthetic": len(synthetic), "n_real_train": len(real_train)}


def tstr_classification(synthetic: ImageSet, real_train: ImageSet, real_test: ImageSet, attribute: str,
                        plan: TrainingPlan = TrainingPlan(steps=400, batch_size=32), seed: int = 0,
                        n_boot: int = 200, classes: Sequence[str] | None = None,
                        cache: RealSideCache | None = None) -> dict:
    """One-vs-rest macro AUC on real test of a classifier trained on synthetic (prompted attribute values)
    vs one trained on real train (true values)."""
    classes = _classes(attribute, classes, real_train, synthetic, real_test)
    truth = np.array([classes.index(v) for v in _attribute_labels(real_test, attribute)])
    probabilities = _tstr_arms("classification", synthetic, real_train, real_test, None, attribute, plan, seed, cache,
                               classes)
    result = _paired(lambda rows: macro_auc(probabilities["real"][rows], truth[rows]),
                     lambda rows: macro_auc(probabilities["synthetic"][rows], truth[rows]), real_test.groups, n_boot, seed)
    return {"metric": "auc", "attribute": attribute, "classes": classes, **result, "n_test": len(real_test),
            "n_synthetic": len(synthetic), "n_real_train": len(real_train)}


def _tstr_arms(task: str, synthetic: ImageSet, real_train: ImageSet, real_test: ImageSet,
               labels: Sequence[int] | None, attribute: str | None, plan: TrainingPlan, seed: int,
               cache: RealSideCache | None, classes: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Test outputs of the model trained on synthetic only and of the one trained on all of real train: the
    augmentation study's fit with no real rows, and its real-only fit on every row (the same model, so a cache
    trains it once for both)."""
    _, fit_and_score = _task_scorer(task, real_train, synthetic, real_test, labels, attribute, plan, cache, classes)
    return {"synthetic": fit_and_score(np.arange(0), True, seed),
            "real": fit_and_score(np.arange(len(real_train)), False, seed)}


def train_on_synthetic_test_on_real(synthetic: ImageSet, real_train: ImageSet, real_test: ImageSet, *,
                                    labels: Sequence[int] | None = None, attribute: str | None = None,
                                    segmentation_plan: TrainingPlan = TrainingPlan(),
                                    classification_plan: TrainingPlan = TrainingPlan(steps=400, batch_size=32),
                                    seed: int = 0, n_boot: int = 200,
                                    label_names: Mapping[int, str] | None = None,
                                    cache: RealSideCache | None = None) -> dict:
    """TSTR vs TRTR for segmentation (when ``labels`` are given) and classification (when ``attribute`` is).

    cache: keeps the train-on-real models' test outputs (``real_side``)."""
    result = {}
    if labels is not None:
        result["segmentation"] = tstr_segmentation(synthetic, real_train, real_test, labels, segmentation_plan, seed,
                                                   n_boot, label_names, cache)
    if attribute is not None:
        result["classification"] = tstr_classification(synthetic, real_train, real_test, attribute,
                                                        classification_plan, seed, n_boot, cache=cache)
    if not result:
        raise ValueError("train_on_synthetic_test_on_real needs labels (segmentation), attribute (classification) or both")
    return result


# -------------------------------------------------------------------------------------------- augmentation gain


def patient_subsample(groups: Sequence[str], fraction: float, seed: int) -> np.ndarray:
    """Indices of the images of a seeded ``fraction`` of the patients (at least one).

    One patient order per seed, cut at each fraction: the 10% subset lies inside the 25% one, so fractions
    differ by data added, not by which patients happened to be drawn.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    patients = np.unique(np.asarray(groups, dtype=str))
    order = np.random.default_rng(seed).permutation(len(patients))
    kept = set(patients[order[:max(1, round(fraction * len(patients)))]].tolist())
    return np.array([i for i, g in enumerate(groups) if str(g) in kept], dtype=int)


def augmentation_gain(real_train: ImageSet, synthetic: ImageSet, real_test: ImageSet,
                      fractions: Sequence[float] = (0.1, 0.25, 1.0), seeds: Sequence[int] = (0, 1, 2),
                      task: str = "segmentation", labels: Sequence[int] | None = None, attribute: str | None = None,
                      steps: int | None = None, plan: TrainingPlan | None = None, n_boot: int = 200,
                      bootstrap_seed: int = 0, cache: RealSideCache | None = None) -> dict:
    """Real-fraction alone vs real-fraction + all synthetic, per fraction, averaged over seeds.

    For each fraction and seed, two models with the same seed and number of steps: one on the patient
    subsample, one on it pooled with the synthetic set (sampled uniformly from the pool). Metric on real
    test: macro Dice over ``labels`` (segmentation) or macro AUC of ``attribute`` (classification). Gain =
    mean over seeds of (augmented - real only); its CI is a paired bootstrap over test patients (the same
    draw scores every seed and both arms). cache: keeps the real-only models' test outputs (``real_side``).
    """
    if task not in ("segmentation", "classification"):
        raise ValueError(f"task must be 'segmentation' or 'classification', got '{task}'")
    if task == "segmentation" and labels is None:
        raise ValueError("augmentation_gain(task='segmentation') needs labels")
    if task == "classification" and attribute is None:
        raise ValueError("augmentation_gain(task='classification') needs attribute")
    plan = plan or (TrainingPlan() if task == "segmentation" else TrainingPlan(steps=400, batch_size=32))
    plan = replace(plan, steps=steps) if steps is not None else plan
    score_test, fit_and_score = _task_scorer(task, real_train, synthetic, real_test, labels, attribute, plan, cache)

    table = []
    for fraction in fractions:
        outputs: dict[str, list[np.ndarray]] = {"real_only": [], "augmented": []}
        per_seed = []
        everything = np.arange(len(real_test))
        for seed in seeds:
            rows = patient_subsample(real_train.groups, fraction, seed)
            outputs["real_only"].append(fit_and_score(rows, False, seed))
            outputs["augmented"].append(fit_and_score(rows, True, seed))
            per_seed.append({"seed": seed, "n_real_images": len(rows),
                             "n_real_patients": len({real_train.groups[i] for i in rows}),
                             "real_only": score_test(outputs["real_only"][-1], everything),
                             "augmented": score_test(outputs["augmented"][-1], everything)})
        table.append({"fraction": float(fraction),
                      "n_real_images": float(np.mean([s["n_real_images"] for s in per_seed])),
                      **_gain_estimates(score_test, outputs, real_test.groups, n_boot, bootstrap_seed),
                      "per_seed": per_seed})
    return {"task": task, "metric": "dice" if task == "segmentation" else "auc", "seeds": list(seeds),
            "n_synthetic": len(synthetic), "n_test": len(real_test), "fractions": table}


def _gain_estimates(score_test: Callable[[np.ndarray, np.ndarray], float], outputs: dict[str, list[np.ndarray]],
                    groups: Sequence[str], n_boot: int, seed: int) -> dict[str, Estimate]:
    """Seed-averaged real-only and augmented metrics and their difference, on the same test-patient draws."""

    def arm_mean(arm: str) -> Callable[[np.ndarray], float]:
        return lambda rows: float(np.mean([score_test(output, rows) for output in outputs[arm]]))

    real_only, augmented = arm_mean("real_only"), arm_mean("augmented")
    return {"real_only": bootstrap(real_only, [groups], n_boot, seed),
            "augmented": bootstrap(augmented, [groups], n_boot, seed),
            "gain": bootstrap(lambda rows: augmented(rows) - real_only(rows), [groups], n_boot, seed)}


def _task_scorer(task: str, real_train: ImageSet, synthetic: ImageSet, real_test: ImageSet,
                 labels: Sequence[int] | None, attribute: str | None, plan: TrainingPlan,
                 cache: RealSideCache | None = None, classes: Sequence[str] | None = None
                 ) -> tuple[Callable[[np.ndarray, np.ndarray], float], Callable[[np.ndarray, bool, int], np.ndarray]]:
    """(score(test outputs, test rows) -> float, fit_and_score(real rows, augmented, seed) -> test outputs).

    A fit on real rows alone reads no synthetic image: with a ``cache`` its test outputs are kept and reused.
    """
    scorer, fit_and_score = _task_fit(task, real_train, synthetic, real_test, labels, attribute, plan, classes)
    if cache is None:
        return scorer, fit_and_score
    if task == "segmentation":
        target = {"labels": list(labels), "num_classes": _num_classes(labels, real_train, synthetic, real_test)}
    else:
        target = {"attribute": attribute, "classes": _classes(attribute, classes, real_train, synthetic, real_test)}

    def cached(rows: np.ndarray, augmented: bool, seed: int) -> np.ndarray:
        if augmented:
            return fit_and_score(rows, augmented, seed)
        return cache.arrays("utility_real_only", lambda: {"outputs": fit_and_score(rows, False, seed)}, task=task,
                            rows=rows_digest(rows), seed=seed, plan=asdict(plan), **target)["outputs"]

    return scorer, cached


def _classes(attribute: str, classes: Sequence[str] | None, *sets: ImageSet) -> list[str]:
    """The classifier's classes: given, else every value of ``attribute`` in the sets, sorted."""
    if classes is not None:
        return list(classes)
    return sorted(set().union(*(_attribute_labels(s, attribute) for s in sets)))


def _task_fit(task: str, real_train: ImageSet, synthetic: ImageSet, real_test: ImageSet,
              labels: Sequence[int] | None, attribute: str | None, plan: TrainingPlan,
              classes: Sequence[str] | None
              ) -> tuple[Callable[[np.ndarray, np.ndarray], float], Callable[[np.ndarray, bool, int], np.ndarray]]:
    if task == "segmentation":
        num_classes = _num_classes(labels, real_train, synthetic, real_test)
        train_masks, synthetic_masks = _require_masks(real_train, "real train"), _require_masks(synthetic, "synthetic")
        test_masks = _require_masks(real_test, "real test")

        def fit_and_score(rows: np.ndarray, augmented: bool, seed: int) -> np.ndarray:
            images, masks = real_train.images[rows], train_masks[rows]
            if augmented:
                images, masks = ConcatenatedRows(images, synthetic.images), ConcatenatedRows(masks, synthetic_masks)
            model = _train_segmenter(images, masks, num_classes, plan, seed)
            return per_label_dice(model.predict(real_test.images), test_masks, labels)

        return _macro_dice, fit_and_score

    train_labels, synthetic_labels = _attribute_labels(real_train, attribute), _attribute_labels(synthetic, attribute)
    classes = _classes(attribute, classes, real_train, synthetic, real_test)
    truth = np.array([classes.index(v) for v in _attribute_labels(real_test, attribute)])

    def fit_and_score_classifier(rows: np.ndarray, augmented: bool, seed: int) -> np.ndarray:
        images, chosen = real_train.images[rows], [train_labels[i] for i in rows]
        if augmented:
            images, chosen = ConcatenatedRows(images, synthetic.images), chosen + synthetic_labels
        model = _train_classifier(images, chosen, classes, plan, seed)
        return model.predict_proba(_as_channels(real_test.images))

    return (lambda probabilities, rows: macro_auc(probabilities[rows], truth[rows])), fit_and_score_classifier

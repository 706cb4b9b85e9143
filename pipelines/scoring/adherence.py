"""Conditioning adherence: does a sample show what it was generated for?

Four questions, each answered against a reference measured on real data the same way:
- masks: a segmenter trained on real images segments the sample; its Dice against the conditioning mask,
  over its Dice on real test images against their ground truth (the best the judge can do), is the mask-Dice
  ratio (about 1 when the sample follows its mask as well as a real image does; far below when not);
- volumes: the segmented volume of each label against the conditioning mask's volume;
- intensities: each label's median intensity, in physical units (HU for CT), inside the range of the real
  data's per-image medians (a liver at 260 HU is not a liver);
- attributes: a classifier trained on real images recognises the prompted attribute in the sample as often
  as it recognises the true attribute in real test images.
Ratios and accuracies carry a bootstrap CI: synthetic samples are resampled by sample, real ones by patient,
jointly. The intensity gate uses an exact distribution-free test instead (see ``intensity_plausibility``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

from .attribute_classifier import AttributeClassifier
from .bootstrap import Estimate, bootstrap
from .image_sets import ImageSet, map_batches
from .segmenter import Segmenter, per_label_dice

__all__ = [
    "attribute_adherence",
    "dice_ratio_from_scores",
    "intensity_plausibility",
    "label_volumes",
    "mask_dice_ratio",
    "per_sample_medians",
    "real_range",
    "segment",
    "volume_agreement",
]

# The lowest 5% of the [-1, 1] scale is taken as background when no masks are given: air below the CT window,
# the zero background of MRI, the clipped border of a radiograph.
FOREGROUND_THRESHOLD = -0.9


def _nanmean(values: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    """``np.nanmean`` without the all-NaN warning (an all-NaN slice is a legitimate 'not measurable')."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=axis)


def _ratio(numerator: float, denominator: float) -> float:
    """A ratio to a real-data ceiling; undefined (NaN) when the ceiling is 0, e.g. a label the model never finds."""
    return numerator / denominator if denominator > 0 else math.nan


def _names(labels: Sequence[int], label_names: Mapping[int, str] | None) -> list[str]:
    return [str(label_names.get(label, label)) if label_names else str(label) for label in labels]


def _require_masks(image_set: ImageSet, role: str) -> np.ndarray:
    if image_set.masks is None:
        raise ValueError(f"{image_set.name or role}: this score needs label masks, but the set has none")
    return image_set.masks


# ------------------------------------------------------------------------------------------------- mask Dice


@dataclass
class Segmented:
    """A segmenter's reading of a set, per image and label (N, L): Dice of its prediction against the set's own
    label maps, and the label's volume in the prediction and in the map (see ``label_volumes``)."""

    dice: np.ndarray
    predicted_volumes: np.ndarray
    mask_volumes: np.ndarray


def segment(segmenter: Segmenter, image_set: ImageSet, labels: Sequence[int],
            spacing: Sequence[float] | None = None) -> Segmented:
    """Segment every image of ``image_set`` once, a batch at a time (a set held on disk is never read whole):
    what the mask-Dice ratio and the volume agreement both read. spacing: for the volumes (default the set's)."""
    masks = _require_masks(image_set, "image set")
    spacing = image_set.spacing if spacing is None else spacing

    def per_batch(part: slice) -> np.ndarray:
        predicted, target = segmenter.predict(image_set.images[part]), np.asarray(masks[part])
        return np.concatenate([per_label_dice(predicted, target, labels),
                               label_volumes(predicted, spacing, labels),
                               label_volumes(target, spacing, labels)], axis=1)

    table = map_batches(per_batch, len(image_set))
    return Segmented(*np.split(table, 3, axis=1))


def mask_dice_ratio(segmenter: Segmenter, synthetic: ImageSet, real_test: ImageSet, labels: Sequence[int],
                    n_boot: int = 200, seed: int = 0, label_names: Mapping[int, str] | None = None) -> dict:
    """Segment synthetic and real test images with a segmenter trained on real images, and compare its Dice.

    The segmenter is trained by the caller on the real *train* split. Synthetic Dice is against the
    conditioning masks (``synthetic.masks``); real Dice against ground truth. See ``dice_ratio_from_scores``.
    """
    return dice_ratio_from_scores(segment(segmenter, synthetic, labels).dice,
                                  segment(segmenter, real_test, labels).dice, synthetic.groups, real_test.groups,
                                  labels, synthetic.ids, n_boot, seed, label_names)


def dice_ratio_from_scores(synthetic_dice: np.ndarray, real_dice: np.ndarray, synthetic_groups: Sequence[str],
                           real_groups: Sequence[str], labels: Sequence[int], synthetic_ids: Sequence[str],
                           n_boot: int = 200, seed: int = 0, label_names: Mapping[int, str] | None = None) -> dict:
    """Mask-Dice ratio from per-sample, per-label Dice (N, L) of the synthetic and the real test set.

    Per label: mean synthetic Dice / mean real Dice (images where the label is absent from both prediction and
    mask are NaN and skipped). Mean: the ratio of the macro Dice (mean over the labels measurable in both sets)
    of the two sets, so that a rare label's noisy ratio does not dominate. All CIs are joint bootstraps over
    synthetic samples and real test patients; replicates where a rare label vanishes are dropped for that
    label only.
    """
    names = _names(labels, label_names)
    groups = [synthetic_groups, real_groups]
    measurable = [j for j in range(len(labels))
                  if np.isfinite(synthetic_dice[:, j]).any() and np.isfinite(real_dice[:, j]).any()]

    def column_mean(dice: np.ndarray, j: int) -> Callable[[np.ndarray], float]:
        return lambda rows: float(_nanmean(dice[rows, j]))

    def macro(dice: np.ndarray) -> Callable[[np.ndarray], float]:
        return lambda rows: float(_nanmean(_nanmean(dice[rows][:, measurable], axis=0))) if measurable else math.nan

    def per_set(synthetic_stat, real_stat) -> dict[str, Estimate]:
        return {
            "synthetic_dice": bootstrap(lambda s, r: synthetic_stat(s), groups, n_boot, seed),
            "real_dice": bootstrap(lambda s, r: real_stat(r), groups, n_boot, seed),
            "ratio": bootstrap(lambda s, r: _ratio(synthetic_stat(s), real_stat(r)), groups, n_boot, seed),
        }

    per_label = {
        name: per_set(column_mean(synthetic_dice, j), column_mean(real_dice, j))
        | {"n_synthetic": int(np.isfinite(synthetic_dice[:, j]).sum()), "n_real": int(np.isfinite(real_dice[:, j]).sum())}
        for j, name in enumerate(names)
    }
    sample_means = _nanmean(synthetic_dice, axis=1)
    per_sample = [
        {"id": sample_id, **{f"mask_dice_{name}": float(synthetic_dice[i, j]) for j, name in enumerate(names)},
         "mask_dice_mean": float(sample_means[i])}
        for i, sample_id in enumerate(synthetic_ids)
    ]
    return {
        "labels": names,
        "n_synthetic": len(synthetic_dice),
        "n_real": len(real_dice),
        "per_label": per_label,
        "mean": per_set(macro(synthetic_dice), macro(real_dice)) | {"labels": [names[j] for j in measurable]},
        "per_sample": per_sample,
        "per_sample_dice": synthetic_dice,
    }


# ---------------------------------------------------------------------------------------------- label volumes


def label_volumes(masks: np.ndarray, spacing: Sequence[float], labels: Sequence[int]) -> np.ndarray:
    """Volume of each label in each mask, (N, L): ml for 3D masks, cm^2 for 2D ones (from the voxel spacing)."""
    masks = np.asarray(masks)
    if len(spacing) != masks.ndim - 1:
        raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} axes but masks have {masks.ndim - 1}")
    voxel = float(np.prod(spacing)) / (1000.0 if len(spacing) == 3 else 100.0)  # mm^3 -> ml, mm^2 -> cm^2
    flat = masks.reshape(len(masks), -1)
    return np.stack([(flat == label).sum(1) * voxel for label in labels], axis=1) if labels else np.zeros((len(masks), 0))


def _agreement(predicted: np.ndarray, reference: np.ndarray) -> dict:
    """Relative error (over images with the label in the reference) and correlations of two volume vectors."""
    has_label = reference > 0
    relative = (predicted[has_label] - reference[has_label]) / reference[has_label]
    either = has_label | (predicted > 0)
    p, r = predicted[either], reference[either]
    # A correlation needs >= 3 points that vary; otherwise it is undefined, not 0 or 1.
    varies = len(p) >= 3 and np.ptp(p) > 0 and np.ptp(r) > 0
    return {
        "median_relative_error": float(np.median(relative)) if len(relative) else math.nan,
        "median_absolute_relative_error": float(np.median(np.abs(relative))) if len(relative) else math.nan,
        "pearson": float(stats.pearsonr(p, r)[0]) if varies else math.nan,
        "spearman": float(stats.spearmanr(p, r)[0]) if varies else math.nan,
        "n": int(has_label.sum()),
    }


def volume_agreement(predicted_volumes: np.ndarray, conditioning_volumes: np.ndarray, labels: Sequence[int],
                     spatial_dims: int, real_predicted_volumes: np.ndarray | None = None,
                     real_truth_volumes: np.ndarray | None = None,
                     label_names: Mapping[int, str] | None = None) -> dict:
    """Per label: the segmented volume of each sample against the volume its conditioning mask asked for.

    Relative error is (predicted - conditioning) / conditioning over samples whose conditioning mask has the
    label (signed median: systematic over- or under-growth; absolute median: typical miss). Pearson and
    Spearman correlation run over samples where the label is in either map. With the real test images' volumes
    (the same segmenter's and the ground truth's) the same numbers are given as the reference: the
    segmenter's own volume error bounds what a perfect generator could reach. Volumes are (N, L), as
    ``label_volumes`` gives them.
    """
    names = _names(labels, label_names)
    reference = None
    if real_predicted_volumes is not None and real_truth_volumes is not None:
        reference = {name: _agreement(real_predicted_volumes[:, j], real_truth_volumes[:, j])
                     for j, name in enumerate(names)}
    return {
        "unit": "ml" if spatial_dims == 3 else "cm2",
        "labels": names,
        "per_label": {name: _agreement(predicted_volumes[:, j], conditioning_volumes[:, j])
                      for j, name in enumerate(names)},
        "reference": reference,
        "predicted_volumes": predicted_volumes,
        "conditioning_volumes": conditioning_volumes,
    }


# ----------------------------------------------------------------------------------------- intensity plausibility


def per_sample_medians(image_set: ImageSet, labels: Sequence[int] | None = None) -> np.ndarray:
    """Median physical intensity (HU for CT) of each region in each image, (N, R).

    Regions are the labels (from the set's masks: for a synthetic set, its conditioning masks) or, without
    labels, one region: the foreground (above the bottom 5% of the [-1, 1] scale; the whole image when an
    image has no foreground). NaN where an image lacks the label.
    """
    n = len(image_set)
    masks = None if labels is None else _require_masks(image_set, "image set")
    medians = np.full((n, 1 if labels is None else len(labels)), np.nan)
    for i in range(n):  # one image at a time: a set held on disk is never read whole
        image = np.asarray(image_set.images[i])
        physical = image_set.intensity.inverse(image)
        if labels is None:
            foreground = image > FOREGROUND_THRESHOLD
            medians[i, 0] = np.median(physical[foreground]) if foreground.any() else np.median(physical)
            continue
        for j, label in enumerate(labels):
            inside = masks[i] == label
            if inside.any():
                medians[i, j] = np.median(physical[inside])
    return medians


def real_range(real_values: np.ndarray, tail: float = 0.005) -> tuple[float, float, int]:
    """[p0.5, p99.5] of the real values, taken as order statistics: the k-th smallest and k-th largest value,
    k = max(1, floor(tail * (N + 1))).

    Order statistics make the range's coverage known exactly: a new value exchangeable with the N real ones
    falls outside with probability 2k / (N + 1) whatever the distribution (about 1% for large N; below ~200
    real images k = 1 and the range is [min, max], outside with probability 2 / (N + 1)).
    """
    ordered = np.sort(real_values[np.isfinite(real_values)])
    n = len(ordered)
    if n < 2:
        return math.nan, math.nan, 0
    k = max(1, min(math.floor(tail * (n + 1)), n // 2))
    return float(ordered[k - 1]), float(ordered[n - k]), k


def intensity_plausibility(synthetic: ImageSet, real: ImageSet, labels: Sequence[int] | None = None,
                           margin: float = 0.05, alpha: float = 0.01, tail: float = 0.005, n_boot: int = 200,
                           seed: int = 0, label_names: Mapping[int, str] | None = None) -> dict:
    """Is each label's median intensity within the range real images show?

    Per region (each label, or the foreground without labels), the real range is [p0.5, p99.5] of the real
    per-image medians (see ``real_range``), and a synthetic sample is flagged when its median falls outside.
    A real-like synthetic set falls outside at the known rate 2k / (N + 1) (the real set's own share inside,
    1 - 2k / N, is about the same), and its count outside then follows a beta-binomial law
    (M samples, a = 2k, b = N + 1 - 2k) exactly, for any intensity distribution. A region fails when
    - its share inside is more than ``margin`` (5 points) below the expected 1 - 2k / (N + 1), and
    - that shortfall is significant: beta-binomial P(count outside >= observed) < ``alpha`` / number of regions
      (0.01 over all regions together, so real-like data fail the gate in at most ~1% of draws).
    The margin keeps a huge set from failing on a negligible excess; the test keeps a small set from failing on
    sampling noise. The dataset passes when every region both sets contain passes. Images of one patient are
    treated as exchangeable draws (conservative enough for the ~1.4 images per patient typical here).
    """
    regions = ["foreground"] if labels is None else _names(labels, label_names)
    synthetic_medians, real_medians = per_sample_medians(synthetic, labels), per_sample_medians(real, labels)
    outside = np.zeros_like(synthetic_medians, dtype=bool)
    evaluable = [j for j in range(len(regions))
                 if np.isfinite(synthetic_medians[:, j]).any() and np.isfinite(real_medians[:, j]).sum() >= 2]
    per_region = {}
    for j, region in enumerate(regions):
        synthetic_j, real_j = synthetic_medians[:, j], real_medians[:, j]
        low, high, k = real_range(real_j, tail)
        measured = np.isfinite(synthetic_j)
        outside[:, j] = measured & ~((synthetic_j >= low) & (synthetic_j <= high))
        n_real, n_synthetic = int(np.isfinite(real_j).sum()), int(measured.sum())
        row = {"real_range": [low, high], "order_statistic": k, "n_synthetic": n_synthetic, "n_real": n_real,
               "synthetic_median_of_medians": float(np.median(synthetic_j[measured])) if n_synthetic else math.nan,
               "real_median_of_medians": float(np.nanmedian(real_j)) if n_real else math.nan,
               "share_inside": None, "expected_share_inside": math.nan, "real_share_inside": math.nan,
               "p_value": math.nan, "passed": None}
        if j in evaluable:
            real_finite = real_j[np.isfinite(real_j)]
            n_outside = int(outside[measured, j].sum())
            expected_outside = 2 * k / (n_real + 1)
            p_value = float(stats.betabinom.sf(n_outside - 1, n_synthetic, 2 * k, n_real + 1 - 2 * k))
            significant = p_value < alpha / len(evaluable)
            inside_j = (~outside[:, j]).astype(float)
            inside_j[~measured] = math.nan

            def share(s: np.ndarray, inside_j=inside_j) -> float:
                return float(_nanmean(inside_j[s]))

            row |= {"share_inside": bootstrap(share, [synthetic.groups], n_boot, seed),
                    "expected_share_inside": 1.0 - expected_outside,
                    "real_share_inside": float(((real_finite >= low) & (real_finite <= high)).mean()),
                    "p_value": p_value,
                    "passed": not (n_outside / n_synthetic - expected_outside > margin and significant)}
        per_region[region] = row
    decisions = [r["passed"] for r in per_region.values() if r["passed"] is not None]
    reasons = [f"region {region}: {r['share_inside'].value:.0%} of synthetic medians inside the real range "
               f"{r['real_range'][0]:.4g}..{r['real_range'][1]:.4g}, {r['expected_share_inside']:.0%} expected of "
               f"real-like data (p = {r['p_value']:.2g})"
               for region, r in per_region.items() if r["passed"] is False]
    per_sample = [
        {"id": sample_id,
         **{f"median_{region}": float(synthetic_medians[i, j]) for j, region in enumerate(regions)},
         "intensity_outside": [region for j, region in enumerate(regions) if outside[i, j]],
         "intensity_flag": bool(outside[i].any())}
        for i, sample_id in enumerate(synthetic.ids)
    ]
    return {
        "unit": "HU" if synthetic.intensity.mode == "ct_window" else "intensity",
        "tail": tail,
        "margin": margin,
        "alpha": alpha,
        "per_label": per_region,
        "passed": bool(all(decisions)) if decisions else None,
        "reasons": reasons,
        "share_flagged": float(outside.any(axis=1).mean()) if len(outside) else math.nan,
        "per_sample_outside": outside.any(axis=1).tolist(),
        "per_sample": per_sample,
    }


# ------------------------------------------------------------------------------------------ attribute adherence


def _attribute_values(image_set: ImageSet, attribute: str, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Indices of images whose ``attribute`` is one of ``classes``, and those values as strings."""
    values = [condition.get(attribute) for condition in image_set.conditions]
    rows = np.array([i for i, v in enumerate(values) if v is not None and str(v) in classes], dtype=int)
    return rows, np.array([str(values[i]) for i in rows], dtype=object)


def _balanced_accuracy(predicted: np.ndarray, truth: np.ndarray) -> float:
    present = np.unique(truth)
    return float(np.mean([(predicted[truth == c] == c).mean() for c in present])) if len(present) else math.nan


def attribute_adherence(classifier: AttributeClassifier, synthetic: ImageSet, real_test: ImageSet, attribute: str,
                        n_boot: int = 200, seed: int = 0) -> dict:
    """Does a classifier trained on real images see the prompted ``attribute`` in the samples?

    Accuracy per prompted value (from ``synthetic.conditions``), balanced accuracy over the prompted values,
    the classifier's balanced accuracy on real test images (true values from ``real_test.conditions``) and
    their ratio (about 1: as recognisable as real; at ``chance_ratio``: the prompt is ignored). Chance is
    1 / number of prompted values scored: what any classifier blind to the image gets in balanced accuracy.
    Samples prompted with a value the classifier does not know are counted in ``n_unscored``.
    """
    classes = classifier.classes
    synthetic_rows, prompted = _attribute_values(synthetic, attribute, classes)
    real_rows, truth = _attribute_values(real_test, attribute, classes)
    if len(synthetic_rows) == 0 or len(real_rows) == 0:
        raise ValueError(f"attribute '{attribute}': no synthetic or no real test image has a value among {classes}")

    def predict(image_set: ImageSet, rows: np.ndarray) -> np.ndarray:
        def per_batch(part: slice) -> np.ndarray:
            images = np.ascontiguousarray(image_set.images[rows[part]], dtype=np.float32)
            return np.array(classifier.predict(torch.from_numpy(images)[:, None]), dtype=object)

        return map_batches(per_batch, len(rows))

    synthetic_predicted, real_predicted = predict(synthetic, synthetic_rows), predict(real_test, real_rows)
    groups = [[synthetic.groups[i] for i in synthetic_rows], [real_test.groups[i] for i in real_rows]]

    def synthetic_balanced(s: np.ndarray) -> float:
        return _balanced_accuracy(synthetic_predicted[s], prompted[s])

    def real_balanced(r: np.ndarray) -> float:
        return _balanced_accuracy(real_predicted[r], truth[r])

    def value_accuracy(value: str) -> Callable[[np.ndarray, np.ndarray], float]:
        def accuracy(s: np.ndarray, r: np.ndarray) -> float:
            chosen = prompted[s] == value
            return float((synthetic_predicted[s][chosen] == value).mean()) if chosen.any() else math.nan
        return accuracy

    prompted_values = sorted(set(prompted.tolist()))
    chance = 1.0 / len(prompted_values)
    real_estimate = bootstrap(lambda s, r: real_balanced(r), groups, n_boot, seed)
    correct = synthetic_predicted == prompted
    per_sample = [{"id": synthetic.ids[i], f"prompted_{attribute}": prompted[k],
                   f"predicted_{attribute}": synthetic_predicted[k], f"{attribute}_correct": bool(correct[k])}
                  for k, i in enumerate(synthetic_rows)]
    return {
        "attribute": attribute,
        "per_value": {value: {"accuracy": bootstrap(value_accuracy(value), groups, n_boot, seed),
                              "n": int((prompted == value).sum())} for value in prompted_values},
        "synthetic_balanced_accuracy": bootstrap(lambda s, r: synthetic_balanced(s), groups, n_boot, seed),
        "real_balanced_accuracy": real_estimate,
        "ratio": bootstrap(lambda s, r: _ratio(synthetic_balanced(s), real_balanced(r)), groups, n_boot, seed),
        "chance": chance,
        "chance_ratio": chance / real_estimate.value if real_estimate.value > 0 else math.nan,
        "n": len(synthetic_rows),
        "n_real": len(real_rows),
        "n_unscored": len(synthetic) - len(synthetic_rows),
        "per_sample": per_sample,
    }

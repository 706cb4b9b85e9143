"""ROC figures shared by every scorer that ranks: the membership attack, classifier utility, attribute checks."""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import rankdata

__all__ = ["MAX_FPR", "macro_auc", "mann_whitney_auc", "tpr_at_fpr"]

MAX_FPR = 0.01  # the operating point of Carlini et al.'s "membership inference from first principles"


def mann_whitney_auc(positive_scores: np.ndarray, negative_scores: np.ndarray) -> float:
    """P(score of a positive > score of a negative) + 1/2 P(equal): the ROC AUC via mid-ranks (ties count 1/2)."""
    positive = np.asarray(positive_scores, dtype=np.float64).ravel()
    negative = np.asarray(negative_scores, dtype=np.float64).ravel()
    if len(positive) == 0 or len(negative) == 0:
        raise ValueError("AUC needs at least one positive and one negative score")
    ranks = rankdata(np.concatenate([positive, negative]), method="average")
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def macro_auc(probabilities: np.ndarray, truth: np.ndarray) -> float:
    """One-vs-rest macro AUC: the mean over classes present (with negatives) of each class's AUC.

    probabilities: (N, K) scores per class; truth: (N,) class indices in 0..K-1. NaN when no class has both
    positives and negatives (the AUC is undefined, not 0.5).
    """
    probabilities, truth = np.asarray(probabilities), np.asarray(truth)
    aucs = [mann_whitney_auc(probabilities[truth == k, k], probabilities[truth != k, k])
            for k in range(probabilities.shape[1]) if 0 < (truth == k).sum() < len(truth)]
    return float(np.mean(aucs)) if aucs else math.nan


def tpr_at_fpr(positive_scores: np.ndarray, negative_scores: np.ndarray, max_fpr: float = MAX_FPR) -> float:
    """The largest TPR over thresholds whose FPR is at most ``max_fpr`` (no interpolation: conservative).

    A sample is called positive when its score is >= the threshold. At most k = floor(max_fpr * M) negatives
    may be called positive, so the threshold must lie above the (k+1)-th highest negative score v, and the best
    such threshold calls every positive scoring above v. With M < 1 / max_fpr, k = 0: the TPR at FPR 0.
    """
    positive = np.asarray(positive_scores, dtype=np.float64).ravel()
    negative = np.sort(np.asarray(negative_scores, dtype=np.float64).ravel())[::-1]
    allowed = int(np.floor(max_fpr * len(negative) + 1e-9))
    if allowed >= len(negative):
        return 1.0
    return float(np.mean(positive > negative[allowed]))

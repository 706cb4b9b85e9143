"""Patient-level bootstrap confidence intervals for any statistic of one or more sample sets.

Images of one patient are not independent draws (two views, two time points), so a replicate resamples
*patients* with replacement and takes all of each drawn patient's images. A statistic of several sets (FD of
synthetic vs real, the DCR share of synthetic vs train vs holdout) is bootstrapped jointly: every replicate
redraws every set, so the interval carries the sampling noise of the references too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["Estimate", "bootstrap", "bootstrap_many", "group_members", "group_resample"]


@dataclass(frozen=True)
class Estimate:
    """A number with its bootstrap spread: the value on the full sets, a percentile CI and the replicate SD."""

    value: float
    ci_low: float
    ci_high: float
    sd: float
    n_boot: int
    level: float = 0.95

    def to_dict(self) -> dict:
        return asdict(self)


def group_members(groups: Sequence[str]) -> list[np.ndarray]:
    """The sample indices of each group (patient), computed once per set rather than once per replicate."""
    labels, inverse = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    return np.split(order, np.cumsum(np.bincount(inverse, minlength=len(labels)))[:-1])


def group_resample(members: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Indices of one patient-level bootstrap replicate: draw as many groups as there are, with replacement."""
    drawn = rng.integers(0, len(members), size=len(members))
    return np.concatenate([members[g] for g in drawn])


def bootstrap(statistic: Callable[..., float], groups: Sequence[Sequence[str]], n_boot: int = 200, seed: int = 0,
              level: float = 0.95) -> Estimate:
    """Bootstrap ``statistic(*index_arrays)`` jointly over sets whose samples belong to ``groups[i]``.

    statistic: takes one integer index array per set (into that set's samples) and returns a float; the
        point value is ``statistic(arange(n_0), arange(n_1), ...)``.
    groups: per set, the bootstrap unit of each sample (patient id for real images, the sample's own id for
        synthetic ones).
    Replicates where the statistic is not finite (a degenerate resample) are dropped; the SD and the
    interval come from the rest.
    """
    return bootstrap_many(lambda *rows: [statistic(*rows)], groups, n_boot, seed, level)[0]


def bootstrap_many(statistics: Callable[..., Sequence[float]], groups: Sequence[Sequence[str]], n_boot: int = 200,
                   seed: int = 0, level: float = 0.95) -> list[Estimate]:
    """``bootstrap`` for a function returning several numbers from the same resamples (precision and recall,
    all realism metrics of one feature space): each replicate is drawn once and every number gets its interval,
    at the cost of one evaluation instead of one per number."""
    full = [np.arange(len(g)) for g in groups]
    values = np.asarray(statistics(*full), dtype=float)
    members = [group_members(g) for g in groups]
    rng = np.random.default_rng(seed)
    replicates = np.array([statistics(*(group_resample(m, rng) for m in members)) for _ in range(n_boot)], dtype=float)
    replicates = replicates.reshape(n_boot, len(values))  # n_boot = 0: point values only, no interval
    return [_estimate(float(value), replicates[:, k], level) for k, value in enumerate(values)]


def _estimate(value: float, replicates: np.ndarray, level: float) -> Estimate:
    replicates = replicates[np.isfinite(replicates)]
    if len(replicates) == 0:
        return Estimate(value, float("nan"), float("nan"), float("nan"), 0, level)
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(replicates, [tail, 100.0 - tail])
    return Estimate(value, float(low), float(high), float(replicates.std(ddof=1)) if len(replicates) > 1 else 0.0,
                    len(replicates), level)

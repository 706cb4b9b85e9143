"""Patient-level confidence intervals for any statistic of one or more sample sets.

Images of one patient are not independent draws (two views, two time points), so a replicate resamples
*patients* and takes all of each drawn patient's images. A statistic of several sets (FD of synthetic vs real,
the DCR share of synthetic vs train vs holdout) is resampled jointly: every replicate redraws every set, so the
interval carries the sampling noise of the references too.

Two schemes, one per kind of statistic:
- ``bootstrap``: patients drawn with replacement, percentile interval. Right for means, shares and their
  differences (accuracy, Dice, DCR share), which repeats do not bias.
- ``half_sample``: half of the patients drawn *without* replacement, interval centred on the point value. For
  set-distance and k-NN statistics (FD, KID, precision/recall/density/coverage), which a with-replacement
  replicate biases: repeats act as extra weight on fewer distinct points, so FD and KID rise, density inflates,
  and the percentile interval can lie wholly beside its own point value (measured on the demo: FD 450.8 with
  "CI 458.8 to 532.5"). A half-sample has no repeats, and its spread matches the full sample's: for a mean,
  Var(half-sample mean | data) = s^2 (1/m - 1/n) = s^2 / n at m = n / 2 (Efron's half-sampling). What remains is
  the shift of a statistic that depends on sample size (FD's 1/n bias), which the centring removes: the interval
  is the point value plus the replicates' quantiles about their median.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["Estimate", "bootstrap", "bootstrap_many", "group_members", "group_resample", "half_sample",
           "half_sample_many", "resamples"]


@dataclass(frozen=True)
class Estimate:
    """A number with its spread: the value on the full sets, a CI and the replicate SD."""

    value: float
    ci_low: float
    ci_high: float
    sd: float
    n_boot: int
    level: float = 0.95

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> Estimate:
        return cls(**values)


def group_members(groups: Sequence[str]) -> list[np.ndarray]:
    """The sample indices of each group (patient), computed once per set rather than once per replicate."""
    labels, inverse = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    return np.split(order, np.cumsum(np.bincount(inverse, minlength=len(labels)))[:-1])


def group_resample(members: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Indices of one patient-level bootstrap replicate: draw as many groups as there are, with replacement."""
    drawn = rng.integers(0, len(members), size=len(members))
    return np.concatenate([members[g] for g in drawn])


def half_sample(members: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Indices of one half-sample: half of the groups (rounded up), without replacement, in their original order."""
    drawn = np.sort(rng.choice(len(members), size=(len(members) + 1) // 2, replace=False))
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
    values, replicates = _replicates(statistics, groups, n_boot, seed, group_resample)
    return [_estimate(value, replicates[:, k], level, centred=False) for k, value in enumerate(values)]


def half_sample_many(statistics: Callable[..., Sequence[float]], groups: Sequence[Sequence[str]], n_boot: int = 200,
                     seed: int = 0, level: float = 0.95) -> list[Estimate]:
    """As ``bootstrap_many``, for set-distance and k-NN statistics: each replicate takes half of every set's
    patients without replacement, and each interval is centred on its point value (see the module's note)."""
    values, replicates = _replicates(statistics, groups, n_boot, seed, half_sample)
    return [_estimate(value, replicates[:, k], level, centred=True) for k, value in enumerate(values)]


def resamples(groups: Sequence[str], n_boot: int, seed: int, stream: int,
              draw: Callable[[list[np.ndarray], np.random.Generator], np.ndarray] = half_sample) -> list[np.ndarray]:
    """The rows each replicate draws from the set at position ``stream`` of a joint resample.

    Every set has its own random stream, so a set's replicates do not depend on the other sets: the training set's
    half-samples are the same whether a synthetic set or the real floor is compared with it, and the real side
    of each replicate can be computed once (``realism.RealGeometry``).
    """
    members = group_members(groups)
    rng = np.random.default_rng([seed, stream])
    return [draw(members, rng) for _ in range(n_boot)]


def _replicates(statistics: Callable[..., Sequence[float]], groups: Sequence[Sequence[str]], n_boot: int, seed: int,
                draw: Callable[[list[np.ndarray], np.random.Generator], np.ndarray]) -> tuple[list[float], np.ndarray]:
    full = [np.arange(len(g)) for g in groups]
    values = [float(value) for value in np.asarray(statistics(*full), dtype=float)]
    drawn = [resamples(g, n_boot, seed, stream, draw) for stream, g in enumerate(groups)]
    replicates = np.array([statistics(*rows) for rows in zip(*drawn)], dtype=float)
    return values, replicates.reshape(n_boot, len(values))  # n_boot = 0: point values only, no interval


def _estimate(value: float, replicates: np.ndarray, level: float, centred: bool) -> Estimate:
    replicates = replicates[np.isfinite(replicates)]
    if len(replicates) == 0 or (centred and not np.isfinite(value)):
        return Estimate(value, float("nan"), float("nan"), float("nan"), 0, level)
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(replicates, [tail, 100.0 - tail])
    if centred:  # the replicates' spread about their median, placed around the point value
        shift = value - float(np.median(replicates))
        low, high = low + shift, high + shift
    return Estimate(value, float(low), float(high), float(replicates.std(ddof=1)) if len(replicates) > 1 else 0.0,
                    len(replicates), level)

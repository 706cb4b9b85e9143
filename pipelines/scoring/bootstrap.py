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

__all__ = ["Estimate", "bootstrap", "group_resample"]


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


def group_resample(groups: Sequence[str], rng: np.random.Generator) -> np.ndarray:
    """Indices of one patient-level bootstrap replicate: draw as many groups as there are, with replacement."""
    labels, inverse = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(labels))]
    drawn = rng.integers(0, len(labels), size=len(labels))
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
    full = [np.arange(len(g)) for g in groups]
    value = float(statistic(*full))
    rng = np.random.default_rng(seed)
    replicates = np.array([statistic(*(group_resample(g, rng) for g in groups)) for _ in range(n_boot)], dtype=float)
    replicates = replicates[np.isfinite(replicates)]
    if len(replicates) == 0:
        return Estimate(value, float("nan"), float("nan"), float("nan"), 0, level)
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(replicates, [tail, 100.0 - tail])
    return Estimate(value, float(low), float(high), float(replicates.std(ddof=1)) if len(replicates) > 1 else 0.0,
                    len(replicates), level)

"""Realism of a synthetic set against real images, measured on feature vectors of any feature space.

Every function takes float feature arrays ``(N, F)`` (synthetic or "fake" first where the order matters, the
real reference second) and works in float64. No metric here has an absolute scale that transfers between
feature spaces or sample sizes, which is why ``with_real_floor`` pairs each value with what a second, patient-
disjoint real set scores against the same reference at the same sample size.

- Fréchet distance (FD) between Gaussians fitted to the two sets, and FD-infinity (Chong & Forsyth 2020),
  which removes the first set's finite-sample bias by extrapolating FD over 1/N.
- KID (Bińkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel, averaged over random subsets.
- RBF-MMD: unbiased MMD^2 with a Gaussian kernel whose bandwidth comes from the median heuristic.
- Precision / recall (Kynkäänniemi et al. 2019) and density / coverage (Naeem et al. 2020): k-nearest-neighbour
  balls around each point estimate the support ("manifold") of each set.

Pairwise distances are computed over row blocks, so 20k x 20k sets run in bounded memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import scipy.linalg
import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from radsynth.pipelines.scoring.bootstrap import Estimate, half_sample_many, resamples

__all__ = [
    "DensityCoverage",
    "FrechetDistance",
    "KernelInceptionDistance",
    "PrecisionRecall",
    "RBFMaximumMeanDiscrepancy",
    "RealGeometry",
    "SET_METRICS",
    "comparison_size",
    "density_coverage",
    "fd_infinity",
    "frechet_distance",
    "frechet_distance_features",
    "frechet_distance_from_factors",
    "covariance_factor",
    "gaussian_statistics",
    "kernel_inception_distance",
    "knn_radii",
    "median_bandwidth",
    "precision_recall",
    "rbf_mmd",
    "real_floor",
    "set_metrics",
    "training_rows",
    "with_real_floor",
]

# One distance block holds at most this many float64 entries (64 MiB), whatever the set sizes.
_BLOCK_ELEMENTS = 1 << 23
# Squared distances below this share of the squared norms are rounding noise of the matmul form: exact copies.
_COPY_TOLERANCE = 1e-12


def _features(x: np.ndarray | torch.Tensor, name: str = "features") -> np.ndarray:
    array = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    array = array.astype(np.float64, copy=False)
    if array.ndim != 2:
        raise ValueError(f"{name}: expected a (N, F) feature array, got shape {array.shape}")
    return array


# --------------------------------------------------------------------------------------------- Fréchet distance
def gaussian_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (ddof=1, as torchmetrics and MONAI) of an (N, F) feature array."""
    x = _features(features)
    if len(x) < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {len(x)}")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), in float64.

    When the product of covariances is singular (fewer samples than features, constant features) its square
    root may not be finite; as in the reference FID code, ``eps`` is then added to both diagonals. Rounding
    gives the square root a tiny imaginary part, which is dropped; a large one means the inputs are not
    covariance matrices and raises. The value is not clipped at 0, so it can be about -1e-12 for equal inputs.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"mismatched statistics: means {mu1.shape} {mu2.shape}, covariances {sigma1.shape} "
                         f"{sigma2.shape}")
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(mu1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.abs(covmean.imag).max():.3g} too large: not covariances")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def covariance_factor(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, L) with covariance = L @ L.T (ddof=1), L of shape (F, r) with r = min(N, F).

    With fewer samples than features the centred data itself is a factor (rank <= N - 1); otherwise the
    symmetric square root of the covariance from its eigendecomposition.
    """
    x = _features(features)
    if len(x) < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {len(x)}")
    mean = x.mean(axis=0)
    centred = (x - mean) / np.sqrt(len(x) - 1)
    if len(x) <= x.shape[1]:
        return mean, centred.T
    values, vectors = np.linalg.eigh(centred.T @ centred)
    return mean, vectors * np.sqrt(np.clip(values, 0.0, None))


def frechet_distance_from_factors(mu1: np.ndarray, factor1: np.ndarray, mu2: np.ndarray, factor2: np.ndarray) -> float:
    """FD from covariance factors: Tr((S1 S2)^(1/2)) is the sum of the singular values of L1.T @ L2.

    The nonzero eigenvalues of S1 S2 = L1 L1.T L2 L2.T are those of (L1.T L2)(L1.T L2).T, so no matrix square
    root is needed: exact for singular covariances (no eps offset) and, with N < F, a small N x N problem
    instead of an F x F one (about 100x faster for 20 samples of 480 features).
    """
    trace_sqrt = np.linalg.svd(factor1.T @ factor2, compute_uv=False).sum()
    diff = mu1 - mu2
    return float(diff @ diff + (factor1 ** 2).sum() + (factor2 ** 2).sum() - 2.0 * trace_sqrt)


def frechet_distance_features(a: np.ndarray, b: np.ndarray) -> float:
    """FD between Gaussians fitted to two (N, F) feature sets (equal to ``frechet_distance`` on their statistics)."""
    return frechet_distance_from_factors(*covariance_factor(a), *covariance_factor(b))


def fd_infinity(a: np.ndarray, b: np.ndarray, seed: int = 0, num_points: int = 15, min_size: int | None = None,
                return_slope: bool = False) -> float | tuple[float, float]:
    """FD-infinity (Chong & Forsyth 2020): the FD an infinitely large first set would have against ``b``.

    FD is biased upwards by about c / N in the size N of each set. FD is computed between random subsets of
    ``a`` (without replacement) of ``num_points`` sizes spread evenly over [min_size, len(a)] and the whole of
    ``b``; a least-squares line of FD against 1/N is extrapolated to 1/N = 0. Subsets of a finite ``a`` vary
    around ``a`` as (1/N - 1/len(a)), so the intercept removes ``a``'s own bias too. ``b``'s bias (~ c / len(b))
    remains; compare with a real floor computed the same way.

    min_size: default max(len(a) // 5, min(2 * F + 2, len(a) // 2)): below about 2F samples the covariance is
        badly conditioned and FD stops being linear in 1/N; small sets (fewer than 4F samples) still get a
        range of sizes to fit, over their upper half, but their extrapolation is rough.
    Returns the intercept, or (intercept, slope) with ``return_slope``.
    """
    a, b = _features(a, "a"), _features(b, "b")
    n = len(a)
    if min_size is None:
        min_size = max(n // 5, min(2 * a.shape[1] + 2, n // 2))
    min_size = int(min(max(min_size, 2), n))
    sizes = np.unique(np.linspace(min_size, n, num_points).astype(int))
    if len(sizes) < 2:
        raise ValueError(f"FD-infinity needs at least two subset sizes; got sizes {sizes.tolist()} for {n} samples")
    rng = np.random.default_rng(seed)
    mu_b, factor_b = covariance_factor(b)
    distances = [frechet_distance_from_factors(*covariance_factor(a[rng.choice(n, size, replace=False)]), mu_b, factor_b)
                 for size in sizes]
    slope, intercept = np.polyfit(1.0 / sizes, distances, 1)
    return (float(intercept), float(slope)) if return_slope else float(intercept)


# --------------------------------------------------------------------------------------------- kernel distances
def _unbiased_mmd2(sum_kxx_offdiag: float, sum_kyy_offdiag: float, sum_kxy: float, m: int, n: int) -> float:
    """Unbiased MMD^2 (Gretton et al. 2012, eq. 3) from kernel sums; self-pairs (i, i) are left out."""
    return sum_kxx_offdiag / (m * (m - 1)) + sum_kyy_offdiag / (n * (n - 1)) - 2.0 * sum_kxy / (m * n)


def _polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    dim = x.shape[1]
    kxx = (x @ x.T / dim + 1.0) ** 3
    kyy = (y @ y.T / dim + 1.0) ** 3
    kxy = (x @ y.T / dim + 1.0) ** 3
    return _unbiased_mmd2(kxx.sum() - np.trace(kxx), kyy.sum() - np.trace(kyy), kxy.sum(), len(x), len(y))


def kernel_inception_distance(a: np.ndarray, b: np.ndarray, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """KID: mean and SD over ``subsets`` random subset pairs of the unbiased MMD^2 with k(x, y) = (x.y/F + 1)^3.

    As Bińkowski et al. and torchmetrics' ``KernelInceptionDistance``: each subset draws ``subset_size``
    samples (capped at the smaller set) without replacement from each set; the SD is the population SD of the
    subset values (ddof=0, as torchmetrics). Unbiased, so it scatters around 0 for equal distributions.
    When the subsets would be both whole sets, the value is computed once and the SD is 0.
    """
    a, b = _features(a, "a"), _features(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {len(a)} and {len(b)}")
    if m == len(a) == len(b):  # every "subset" is the whole of both sets: one value, no spread
        return _polynomial_mmd2(a, b), 0.0
    rng = np.random.default_rng(seed)
    values = np.array([_polynomial_mmd2(a[rng.choice(len(a), m, replace=False)],
                                        b[rng.choice(len(b), m, replace=False)]) for _ in range(subsets)])
    return float(values.mean()), float(values.std())


def _squared_distance_blocks(x: np.ndarray, y: np.ndarray) -> Iterator[tuple[slice, torch.Tensor]]:
    """Row blocks of the squared Euclidean distance matrix between x and y (float64), exact copies snapped to 0.

    The matmul form |x|^2 + |y|^2 - 2 x.y is fast but leaves ~1e-13 |x|^2 of rounding where two points are
    equal; copies (bootstrap duplicates, memorised samples) must have distance exactly 0, so such entries are
    snapped. Callers centre the data first, which keeps the norms, and the rounding, small.
    """
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    y_norms = (yt * yt).sum(1)
    rows = max(1, _BLOCK_ELEMENTS // max(1, len(y)))
    for start in range(0, len(x), rows):
        block = xt[start:start + rows]
        x_norms = (block * block).sum(1)
        norms = x_norms[:, None] + y_norms[None, :]
        squared = (norms - 2.0 * block @ yt.T).clamp_min_(0.0)
        squared[squared <= _COPY_TOLERANCE * norms] = 0.0
        yield slice(start, start + len(block)), squared


def _centred(*sets: np.ndarray) -> list[np.ndarray]:
    centre = np.concatenate(sets).mean(axis=0)
    return [s - centre for s in sets]


def median_bandwidth(a: np.ndarray, b: np.ndarray, max_points: int = 1000, seed: int = 0) -> float:
    """Median heuristic: the median Euclidean distance over all pairs i < j of the pooled set a + b.

    Above ``max_points`` pooled points a seeded random subset is used (the median is stable long before, and
    all pairs of 40k points would cost more than the MMD itself). Falls back to 1.0 when all points coincide.
    """
    pooled = np.concatenate([_features(a, "a"), _features(b, "b")])
    if len(pooled) > max_points:
        pooled = pooled[np.random.default_rng(seed).choice(len(pooled), max_points, replace=False)]
    (pooled,) = _centred(pooled)
    distances = np.concatenate([_upper_entries(squared.sqrt().numpy(), rows.start)
                                for rows, squared in _squared_distance_blocks(pooled, pooled)])
    bandwidth = float(np.median(distances)) if len(distances) else 0.0
    return bandwidth if bandwidth > 0 else 1.0


def _upper_entries(block: np.ndarray, row_offset: int) -> np.ndarray:
    """Entries (i, j) with j > i of a row block whose first row is row ``row_offset`` of a square matrix."""
    rows, cols = np.indices(block.shape)
    return block[cols > rows + row_offset]


def rbf_mmd(a: np.ndarray, b: np.ndarray, bandwidth: float | None = None, seed: int = 0) -> float:
    """Unbiased MMD^2 with the Gaussian kernel k(x, y) = exp(-|x - y|^2 / (2 bandwidth^2)).

    bandwidth: None = the median heuristic (``median_bandwidth`` on the pooled set, seeded subset above 1000
        points). For a fair comparison with a real floor, pass the same fixed bandwidth to both calls, e.g.
        ``median_bandwidth(train, unseen)``; with None each call picks its own.
    Kernel sums are taken over row blocks, so memory stays bounded for large sets.
    """
    a, b = _features(a, "a"), _features(b, "b")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"MMD needs at least 2 samples per set, got {len(a)} and {len(b)}")
    if bandwidth is None:
        bandwidth = median_bandwidth(a, b, seed=seed)
    return _set_geometry(a, RealGeometry.of(b, (), bandwidth))["rbf_mmd"]


# ---------------------------------------------------------------------------------- k-NN manifold estimates
def knn_radii(features: np.ndarray, k: int) -> np.ndarray:
    """Distance of each point to its k-th nearest neighbour among the *distinct* points of the same set.

    Exact copies are merged first, so neither the point itself nor any copy of it or of a neighbour counts
    twice. Without this, a point repeated k + 1 times would get radius 0 and the copies of each neighbour would
    shrink every radius around them; with it, repeating points weights them (in density and coverage) but leaves
    the estimated manifold unchanged. NaN for every point when the set has at most k distinct points (no k-th
    neighbour, e.g. a half-sample of a handful of samples): the metrics are then NaN and a resampling interval
    drops the replicate.
    """
    x = _features(features)
    points = _Distinct(x)
    (points.values,) = _centred(points.values)
    return _within_set(points, (k,), None)[0][k][points.inverse]


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019).

    precision: share of fake points inside the real manifold (the union of balls around each real point with
        its k-NN radius): are the samples realistic?
    recall: share of real points inside the fake manifold: does the generator cover the real variety?
    """
    real, fake = _check_pair(real, fake)
    found = _set_geometry(fake, RealGeometry.of(real, (k,)), precision_k=k)
    return found["precision"], found["recall"]


def density_coverage(real: np.ndarray, fake: np.ndarray, k: int = 5) -> tuple[float, float]:
    """Density and coverage (Naeem et al. 2020), both built on real k-NN balls only (robust to fake outliers).

    density: mean number of real balls containing a fake point, over k; E = 1 when fake and real come from
        the same distribution (exchangeability: a fake point is within a real point's k-NN radius with
        probability k / N), > 1 when fakes crowd dense real regions.
    coverage: share of real points whose ball contains at least one fake point (mode dropping lowers it).
    """
    real, fake = _check_pair(real, fake)
    found = _set_geometry(fake, RealGeometry.of(real, (k,)), density_k=k)
    return found["density"], found["coverage"]


SET_METRICS = ("frechet_distance", "kid", "rbf_mmd", "precision", "recall", "density", "coverage")


def set_metrics(fake: np.ndarray, real: np.ndarray | RealGeometry, bandwidth: float, precision_k: int = 3,
                density_k: int = 5, kid_subsets: int = 5, seed: int = 0,
                only: Sequence[str] = SET_METRICS) -> dict[str, float]:
    """FD, KID, RBF-MMD, precision/recall and density/coverage of ``fake`` against ``real`` at once.

    Equal to the metrics' own functions, from one real x real, one fake x fake and one fake x real distance pass
    instead of three real x real and three fake x real passes: inside a resampling interval, at 64 synthetic
    against 1,679 training images, the passes are most of the realism time. ``real`` may be its
    ``RealGeometry`` (for these k and this bandwidth), computed once for every fake set compared with it. A metric
    the sets are too small for (a half-sample of a handful of samples) is NaN, and the interval drops that
    replicate. ``only``: the metrics wanted, the passes the others need are skipped.
    """
    if not set(only) <= set(SET_METRICS):
        raise ValueError(f"unknown metrics {sorted(set(only) - set(SET_METRICS))}; known: {list(SET_METRICS)}")
    reference = real if isinstance(real, RealGeometry) else RealGeometry.of(real, (precision_k, density_k), bandwidth)
    reference.check(fake, (precision_k, density_k), bandwidth)
    fake = _features(fake, "fake")
    pairs = min(len(fake), reference.n) >= 2
    found = {}
    if "frechet_distance" in only:
        found["frechet_distance"] = reference.frechet_distance(fake) if pairs else float("nan")
    if "kid" in only:
        found["kid"] = (kernel_inception_distance(fake, reference.features, subsets=kid_subsets, seed=seed)[0]
                        if pairs else float("nan"))
    found |= _set_geometry(fake, reference, precision_k=precision_k if {"precision", "recall"} & set(only) else None,
                           density_k=density_k if {"density", "coverage"} & set(only) else None,
                           kernel="rbf_mmd" in only)
    return {name: found[name] for name in only}


class _Distinct:
    """A set's distinct rows, how often each occurs, the row -> distinct-row map and each distinct row's first row."""

    def __init__(self, x: np.ndarray) -> None:
        self.values, self.first, self.inverse, counts = np.unique(x, axis=0, return_index=True, return_inverse=True,
                                                                  return_counts=True)
        self.inverse = self.inverse.reshape(-1)
        self.counts = torch.from_numpy(counts.astype(np.float64))


def _within_set(points: _Distinct, ks: Sequence[int], gamma: float | None) -> tuple[dict[int, np.ndarray], float]:
    """k-NN radii of the distinct points for each k (NaN when there are at most k of them) and, given ``gamma``,
    the RBF kernel sum over all ordered pairs of rows, the pairs of a row with itself left out."""
    x, counts = points.values, points.counts
    ks = sorted(set(ks))
    radii = {k: np.full(len(x), np.nan) for k in ks}
    usable = [k for k in ks if len(x) > k]
    kernel_sum = 0.0
    if not usable and gamma is None:  # nothing to compute: no pass
        return radii, 0.0
    for rows, squared in _squared_distance_blocks(x, x):
        if gamma is not None:  # before the diagonal is masked: copies of a row are pairs, k = 1
            kernel_sum += float(counts[rows] @ torch.exp(-gamma * squared) @ counts)
        if usable:
            local = torch.arange(rows.stop - rows.start)
            squared[local, local + rows.start] = torch.inf  # the point itself
            nearest = squared.topk(usable[-1], dim=1, largest=False).values.sqrt().numpy()
            for k in usable:
                radii[k][rows] = nearest[:, k - 1]
    return radii, kernel_sum - float(counts.sum())  # the pairs (i, i) each contribute k(x, x) = 1


def _gamma(bandwidth: float | None) -> float | None:
    return None if bandwidth is None else 1.0 / (2.0 * bandwidth**2)


@dataclass
class RealGeometry:
    """The real set's side of ``set_metrics``, computed once and compared with any number of fake sets.

    Its distinct rows (with counts), their k-NN radii, the RBF kernel sum over its pairs and its Gaussian
    moments. In a realism interval every replicate's half of the training set is such a set, the same for the
    synthetic value and for the real floor (each set has its own random stream) and for every later scoring of
    the same real data: ``real_side`` keeps them (``pack``), so a fresh synthetic set pays for its own side only.
    The rows are ``source[rows]``, read when needed rather than copied into every replicate.
    """

    source: np.ndarray
    rows: np.ndarray
    distinct: np.ndarray  # position in ``rows`` of each distinct row's first occurrence, in sorted row order
    counts: np.ndarray  # occurrences of each distinct row
    radii: dict[int, np.ndarray]  # k -> radius per distinct row, NaN when there are at most k distinct rows
    kernel_sum: float  # RBF kernel over ordered pairs of rows, self-pairs left out (0 without a bandwidth)
    bandwidth: float | None

    @classmethod
    def of(cls, real: np.ndarray, ks: Sequence[int], bandwidth: float | None = None,
           rows: np.ndarray | None = None) -> RealGeometry:
        """The geometry of ``real`` (or of ``real[rows]``) for these k and this bandwidth."""
        source = _features(real, "real")
        rows = np.arange(len(source)) if rows is None else np.asarray(rows)
        points = _Distinct(source[rows])
        points.values = points.values - points.values.mean(axis=0)  # the centre the fake sets are moved by too
        radii, kernel_sum = _within_set(points, ks, _gamma(bandwidth))
        return cls(source, rows, points.first, points.counts.numpy(), radii, kernel_sum, bandwidth)

    @property
    def n(self) -> int:
        return len(self.rows)

    @property
    def features(self) -> np.ndarray:
        return self.source[self.rows]

    def centred(self) -> tuple[np.ndarray, np.ndarray]:
        """(the distinct rows centred on their mean, that mean): the fake set is moved by the same centre."""
        distinct = self.source[self.rows[self.distinct]]
        centre = distinct.mean(axis=0)
        return distinct - centre, centre

    def check(self, fake: np.ndarray, ks: Sequence[int], bandwidth: float | None) -> None:
        if np.shape(fake)[-1] != self.source.shape[1]:
            raise ValueError(f"feature sizes differ: real {self.source.shape[1]} vs fake {np.shape(fake)[-1]}")
        if not set(ks) <= set(self.radii) or bandwidth != self.bandwidth:
            raise ValueError(f"a real geometry for k {sorted(self.radii)}, bandwidth {self.bandwidth} compared at k "
                             f"{sorted(ks)}, bandwidth {bandwidth}")

    def frechet_distance(self, fake: np.ndarray) -> float:
        """FD of ``fake`` against this set, equal to ``frechet_distance_features(fake, features)``.

        Tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of L1.T S2 L1 = (C L1).T (C L1), with
        S1 = L1 L1.T and C this set's centred rows / sqrt(n - 1): no factor of S2, so nothing F x F per replicate.
        """
        mean, factor = covariance_factor(fake)
        rows = self.features
        real_mean = rows.mean(axis=0)
        centred = (rows - real_mean) / np.sqrt(len(rows) - 1)
        projected = centred @ factor
        trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(projected.T @ projected), 0.0, None)).sum()
        diff = mean - real_mean
        return float(diff @ diff + (factor ** 2).sum() + (centred ** 2).sum() - 2.0 * trace_sqrt)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"distinct": self.distinct, "counts": self.counts, "kernel_sum": np.array(self.kernel_sum),
                **{f"radii_{k}": r for k, r in self.radii.items()}}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], source: np.ndarray, rows: np.ndarray,
                    bandwidth: float | None) -> RealGeometry:
        radii = {int(name.split("_")[1]): value for name, value in arrays.items() if name.startswith("radii_")}
        return cls(_features(source, "real"), np.asarray(rows), arrays["distinct"], arrays["counts"], radii,
                   float(arrays["kernel_sum"]), bandwidth)


def pack(geometries: Sequence[RealGeometry]) -> dict[str, np.ndarray]:
    """Several geometries (one per replicate) as flat arrays, for ``real_side``; ``unpack`` reverses it."""
    parts = [g.to_arrays() for g in geometries]
    sizes = np.array([len(part["distinct"]) for part in parts])
    return {name: (np.stack([part[name] for part in parts]) if name == "kernel_sum"
                   else np.concatenate([part[name] for part in parts])) for name in parts[0]} | {"sizes": sizes}


def unpack(arrays: dict[str, np.ndarray], source: np.ndarray, rows: Sequence[np.ndarray],
           bandwidth: float | None) -> list[RealGeometry]:
    ends = np.cumsum(arrays["sizes"])
    geometries = []
    for index, (start, end) in enumerate(zip(np.concatenate([[0], ends[:-1]]), ends)):
        part = {name: value[index] if name == "kernel_sum" else value[start:end]
                for name, value in arrays.items() if name != "sizes"}
        geometries.append(RealGeometry.from_arrays(part, source, rows[index], bandwidth))
    return geometries


def _set_geometry(fake: np.ndarray, reference: RealGeometry, precision_k: int | None = None,
                  density_k: int | None = None, kernel: bool = True) -> dict[str, float]:
    """The distance-based metrics asked for, from one pass over the fake set's distinct rows and one across.

    Balls are closed (distance <= radius) so that an exact copy of a real point lies on the real manifold even
    when that point's radius is 0. Repeated rows count as often as they occur (weights), never as neighbours.
    """
    gamma = _gamma(reference.bandwidth) if kernel else None
    fakes = _Distinct(_features(fake, "fake"))
    real_values, centre = reference.centred()
    fakes.values = fakes.values - centre
    real_counts = torch.from_numpy(reference.counts.astype(np.float64))
    real_radii, real_kernel = reference.radii, reference.kernel_sum
    fake_radii, fake_kernel = _within_set(fakes, [precision_k] if precision_k is not None else [], gamma)

    real_ball = {k: torch.from_numpy(real_radii[k]) for k in real_radii}
    fake_ball = torch.from_numpy(fake_radii[precision_k]) if precision_k is not None else None
    in_real_manifold = torch.zeros(len(fakes.values), dtype=torch.bool)
    balls_containing = torch.zeros(len(fakes.values), dtype=torch.float64)
    nearest_fake = torch.full((len(real_values),), torch.inf, dtype=torch.float64)
    in_fake_manifold = torch.zeros(len(real_values), dtype=torch.bool)
    cross_kernel = 0.0
    for rows, squared in _squared_distance_blocks(fakes.values, real_values):
        if gamma is not None:
            cross_kernel += float(fakes.counts[rows] @ torch.exp(-gamma * squared) @ real_counts)
        distance = squared.sqrt_()
        if precision_k is not None:
            in_real_manifold[rows] = (distance <= real_ball[precision_k][None, :]).any(1)
            in_fake_manifold |= (distance <= fake_ball[rows, None]).any(0)
        if density_k is not None:
            balls_containing[rows] = (distance <= real_ball[density_k][None, :]).to(torch.float64) @ real_counts
            nearest_fake = torch.minimum(nearest_fake, distance.min(0).values)

    found: dict[str, float] = {}
    n_fake, n_real = float(fakes.counts.sum()), float(real_counts.sum())
    if gamma is not None:  # NaN below 2 per set, as the k-NN metrics below k + 1 distinct points (a small resample)
        found["rbf_mmd"] = (_unbiased_mmd2(fake_kernel, real_kernel, cross_kernel, len(fake), reference.n)
                            if min(len(fake), reference.n) >= 2 else float("nan"))
    if precision_k is not None:
        undefined = np.isnan(real_radii[precision_k]).any() or np.isnan(fake_radii[precision_k]).any()
        found["precision"] = float("nan") if undefined else float(fakes.counts @ in_real_manifold.double()) / n_fake
        found["recall"] = float("nan") if undefined else float(real_counts @ in_fake_manifold.double()) / n_real
    if density_k is not None:
        undefined = np.isnan(real_radii[density_k]).any()
        covered = (nearest_fake <= real_ball[density_k]).double()
        found["density"] = float("nan") if undefined else float(fakes.counts @ balls_containing) / (density_k * n_fake)
        found["coverage"] = float("nan") if undefined else float(real_counts @ covered) / n_real
    return found


def _check_pair(real: np.ndarray, fake: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    real, fake = _features(real, "real"), _features(fake, "fake")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sizes differ: real {real.shape[1]} vs fake {fake.shape[1]}")
    return real, fake


# ------------------------------------------------------------------------------- torchmetrics-style objects
def _as_float64(features: torch.Tensor | np.ndarray) -> torch.Tensor:
    x = torch.as_tensor(features).detach().to(torch.float64)
    if x.ndim != 2:
        raise ValueError(f"expected (N, F) features, got shape {tuple(x.shape)}")
    return x


class FrechetDistance(Metric):
    """FD as ``update(features, real) / compute()``: sums and outer-product sums in float64.

    Only O(F^2) state per set whatever the number of samples, and any batching gives the same value as
    ``frechet_distance_features`` on all features at once.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, num_features: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_features = num_features
        for side in ("real", "fake"):
            self.add_state(f"{side}_sum", torch.zeros(num_features, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_outer", torch.zeros(num_features, num_features, dtype=torch.float64),
                           dist_reduce_fx="sum")
            self.add_state(f"{side}_count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, features: torch.Tensor | np.ndarray, real: bool) -> None:
        x = _as_float64(features).to(self.device)
        if x.shape[1] != self.num_features:
            raise ValueError(f"expected {self.num_features} features, got {x.shape[1]}")
        side = "real" if real else "fake"
        setattr(self, f"{side}_sum", getattr(self, f"{side}_sum") + x.sum(0))
        setattr(self, f"{side}_outer", getattr(self, f"{side}_outer") + x.T @ x)
        setattr(self, f"{side}_count", getattr(self, f"{side}_count") + len(x))

    def _statistics(self, side: str) -> tuple[np.ndarray, np.ndarray]:
        n = float(getattr(self, f"{side}_count"))
        if n < 2:
            raise ValueError(f"FrechetDistance needs at least 2 {side} samples, got {int(n)}")
        total = getattr(self, f"{side}_sum").cpu().numpy()
        mean = total / n
        sigma = (getattr(self, f"{side}_outer").cpu().numpy() - n * np.outer(mean, mean)) / (n - 1)
        return mean, sigma

    def compute(self) -> torch.Tensor:
        return torch.tensor(frechet_distance(*self._statistics("fake"), *self._statistics("real")),
                            dtype=torch.float64)


class _FeatureSetMetric(Metric):
    """Keeps all real and fake features (kernel and k-NN metrics need every sample) for ``compute``."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("real_features", default=[], dist_reduce_fx="cat")
        self.add_state("fake_features", default=[], dist_reduce_fx="cat")

    def update(self, features: torch.Tensor | np.ndarray, real: bool) -> None:
        (self.real_features if real else self.fake_features).append(_as_float64(features).to(self.device))

    def _sets(self) -> tuple[np.ndarray, np.ndarray]:
        """(real, fake) as float64 numpy arrays."""
        if not self.real_features or not self.fake_features:
            raise ValueError(f"{type(self).__name__}: update() with both real and fake features before compute()")
        return (dim_zero_cat(self.real_features).cpu().numpy(), dim_zero_cat(self.fake_features).cpu().numpy())


class KernelInceptionDistance(_FeatureSetMetric):
    """KID as an update/compute object; ``compute`` returns (mean, sd) as ``kernel_inception_distance``."""

    higher_is_better = False

    def __init__(self, subsets: int = 100, subset_size: int = 1000, seed: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.subsets, self.subset_size, self.seed = subsets, subset_size, seed

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        real, fake = self._sets()
        mean, sd = kernel_inception_distance(fake, real, self.subsets, self.subset_size, self.seed)
        return torch.tensor(mean, dtype=torch.float64), torch.tensor(sd, dtype=torch.float64)


class RBFMaximumMeanDiscrepancy(_FeatureSetMetric):
    """Unbiased RBF-kernel MMD^2 as an update/compute object (see ``rbf_mmd``)."""

    higher_is_better = False

    def __init__(self, bandwidth: float | None = None, seed: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.bandwidth, self.seed = bandwidth, seed

    def compute(self) -> torch.Tensor:
        real, fake = self._sets()
        return torch.tensor(rbf_mmd(fake, real, self.bandwidth, self.seed), dtype=torch.float64)


class PrecisionRecall(_FeatureSetMetric):
    """Improved precision/recall as an update/compute object; ``compute`` returns (precision, recall)."""

    higher_is_better = True

    def __init__(self, k: int = 3, **kwargs) -> None:
        super().__init__(**kwargs)
        self.k = k

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        precision, recall = precision_recall(*self._sets(), k=self.k)
        return torch.tensor(precision, dtype=torch.float64), torch.tensor(recall, dtype=torch.float64)


class DensityCoverage(_FeatureSetMetric):
    """Density/coverage as an update/compute object; ``compute`` returns (density, coverage)."""

    higher_is_better = True

    def __init__(self, k: int = 5, **kwargs) -> None:
        super().__init__(**kwargs)
        self.k = k

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        density, coverage = density_coverage(*self._sets(), k=self.k)
        return torch.tensor(density, dtype=torch.float64), torch.tensor(coverage, dtype=torch.float64)


# ------------------------------------------------------------------------------------------ real-vs-real floor
# What each named metric can take: a centred interval is cut to it (a density of 0.01 does not get "CI -0.02 to
# 0.05"). KID and MMD are unbiased estimates and rightly go below 0.
METRIC_RANGES = {"frechet_distance": (0.0, np.inf), "precision": (0.0, 1.0), "recall": (0.0, 1.0),
                 "coverage": (0.0, 1.0), "density": (0.0, np.inf)}


def _within_range(estimate: Estimate, bounds: tuple[float, float] | None) -> Estimate:
    if bounds is None or not np.isfinite(estimate.ci_low):
        return estimate
    low, high = bounds
    return replace(estimate, ci_low=float(np.clip(estimate.ci_low, low, high)),
                   ci_high=float(np.clip(estimate.ci_high, low, high)))


def with_real_floor(metric: Callable[[np.ndarray, np.ndarray], float], synthetic: np.ndarray, train: np.ndarray,
                    unseen: np.ndarray, synthetic_groups: Sequence[str] | None, train_groups: Sequence[str],
                    unseen_groups: Sequence[str], n_boot: int = 200, seed: int = 0,
                    known_floor: Callable[[int], Estimate | dict[str, Estimate]] | None = None,
                    reference: Callable[[np.ndarray], object] | None = None) -> dict:
    """A two-set metric of the synthetic set against the training set, next to the real-vs-real floor.

    metric(x, y) -> float compares a set x with the training reference y (FD, KID mean, 1 - coverage, ...); it
    may also return a dict of named numbers (several metrics from the same resamples), and the Estimates
    come back as dicts with the same names.
    Every realism metric depends on sample size, so both sides use the same n = min(len(synthetic),
    len(unseen)) samples, drawn without replacement with ``seed``:
    - synthetic: metric(synthetic subset, train);
    - real_floor: metric(unseen subset, train). Unseen real images (holdout or test) are patient-disjoint
      from train, so this is what a perfect generator, one drawing new patients from the real distribution,
      would score at this n against this reference.
    Each value carries a joint patient-level half-sample CI centred on the value (``half_sample_many``; a
    with-replacement bootstrap biases these metrics): every replicate takes half of the compared set and half of
    the training set, without replacement. Units: synthetic samples are their own unit (None means that), real
    images their patient id.
    known_floor(n): the floor's estimates when they are known already (``real_side``: they depend on the real sets
    and n only, never on the synthetic set), else computed here.
    reference(train rows): what ``metric`` gets as its second argument for those training rows (default: the
    rows' features; a ``RealGeometry`` for ``set_metrics``, computed once per replicate for both sides).
    Returns {"synthetic": Estimate, "real_floor": Estimate, "n": n, "n_reference": len(train)}.
    """
    synthetic, train, unseen = np.asarray(synthetic), np.asarray(train), np.asarray(unseen)
    if synthetic_groups is None:
        synthetic_groups = [f"synthetic-{i}" for i in range(len(synthetic))]
    for name, values, groups in (("synthetic", synthetic, synthetic_groups), ("train", train, train_groups),
                                 ("unseen", unseen, unseen_groups)):
        if len(values) != len(groups):
            raise ValueError(f"{name}: {len(values)} samples but {len(groups)} groups")
    n = comparison_size(len(synthetic), len(unseen))
    floor = known_floor(n) if known_floor is not None else real_floor(
        metric, train, unseen, train_groups, unseen_groups, n, n_boot, seed, reference)
    return {"synthetic": _against_train(metric, synthetic, synthetic_groups, train, train_groups, n, 0, n_boot, seed,
                                        reference),
            "real_floor": floor, "n": n, "n_reference": len(train)}


def comparison_size(n_synthetic: int, n_unseen: int) -> int:
    """The n both sides of ``with_real_floor`` are compared at."""
    return min(n_synthetic, n_unseen)


def real_floor(metric: Callable[[np.ndarray, np.ndarray], float], train: np.ndarray, unseen: np.ndarray,
               train_groups: Sequence[str], unseen_groups: Sequence[str], n: int, n_boot: int = 200,
               seed: int = 0, reference: Callable[[np.ndarray], object] | None = None) -> Estimate | dict[str, Estimate]:
    """``with_real_floor``'s real-vs-real floor at n, alone (what a cache keeps)."""
    return _against_train(metric, np.asarray(unseen), unseen_groups, np.asarray(train), list(train_groups), n, 1,
                          n_boot, seed, reference)


def training_rows(train_groups: Sequence[str], n_boot: int, seed: int) -> list[np.ndarray]:
    """The training rows ``with_real_floor`` compares with: all of them (the value), then each replicate's half."""
    return [np.arange(len(train_groups)), *resamples(train_groups, n_boot, seed, _TRAIN_STREAM)]


_TRAIN_STREAM = 1  # the training set is the second set of each joint half-sample


def _against_train(metric: Callable[[np.ndarray, np.ndarray], float], values: np.ndarray, groups: Sequence[str],
                   train: np.ndarray, train_groups: Sequence[str], n: int, stream: int, n_boot: int,
                   seed: int, reference: Callable[[np.ndarray], object] | None = None
                   ) -> Estimate | dict[str, Estimate]:
    """metric(n of ``values``, train) with its half-sample interval; one random stream per side (``stream``), so
    the floor's subset does not depend on the synthetic set."""
    names: list[str] = []  # set when ``metric`` returns a dict of named numbers

    def evaluate(subset: np.ndarray, train_side) -> list[float]:
        result = metric(subset, train_side)
        if isinstance(result, dict):
            names[:] = list(result)
            return [float(result[name]) for name in names]
        return [float(result)]

    chosen = np.sort(np.random.default_rng([seed, stream]).choice(len(values), n, replace=False))
    subset, subset_groups = values[chosen], [groups[i] for i in chosen]
    reference = reference or (lambda rows: train[rows])
    estimates = half_sample_many(lambda rows, reference_rows: evaluate(subset[rows], reference(reference_rows)),
                                 [subset_groups, list(train_groups)], n_boot=n_boot, seed=seed)
    if not names:
        return estimates[0]
    return {name: _within_range(estimate, METRIC_RANGES.get(name)) for name, estimate in zip(names, estimates)}

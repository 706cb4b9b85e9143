"""Known-answer tests for the realism and diversity metrics (pipelines/scoring/realism.py, diversity.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.metrics import FIDMetric
from scipy.spatial.distance import cdist, pdist
from torchmetrics.image.fid import _compute_fid
from torchmetrics.image.kid import poly_mmd

from radsynth.pipelines.scoring import realism
from radsynth.pipelines.scoring.diversity import (
    ms_ssim_diversity,
    ms_ssim_diversity_comparison,
    ms_ssim_pairs,
    ms_ssim_scales,
    random_pairs,
)
from radsynth.pipelines.scoring.realism import (
    DensityCoverage,
    FrechetDistance,
    KernelInceptionDistance,
    PrecisionRecall,
    RBFMaximumMeanDiscrepancy,
    density_coverage,
    fd_infinity,
    frechet_distance,
    frechet_distance_features,
    gaussian_statistics,
    kernel_inception_distance,
    knn_radii,
    median_bandwidth,
    precision_recall,
    rbf_mmd,
    set_metrics,
    with_real_floor,
)

torch.set_num_threads(1)


def gaussian(seed: int, n: int, d: int, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    return shift + scale * np.random.default_rng(seed).standard_normal((n, d))


def ring_of_modes(seed: int, n: int, modes: int, total_modes: int = 10) -> np.ndarray:
    """n points from the first ``modes`` of ``total_modes`` unit Gaussians on a circle of radius 10 (2D)."""
    rng = np.random.default_rng(seed)
    angles = np.arange(total_modes) * 2 * np.pi / total_modes
    centres = 10 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return centres[rng.integers(0, modes, n)] + rng.standard_normal((n, 2))


def correlated(seed: int, n: int, d: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + rng.standard_normal(d)


# ----------------------------------------------------------------------------------------------------- FD
def test_fd_of_a_set_with_itself_is_zero():
    features = correlated(0, 500, 32)
    assert abs(frechet_distance_features(features, features)) < 1e-6


def test_fd_of_two_gaussian_samples_matches_its_expected_finite_sample_bias():
    # Two independent samples of N(0, I_d), n each. To second order in 1/sqrt(n):
    #   E||mu1 - mu2||^2 = 2d/n;
    #   the trace term is the squared Bures distance between S1 = I + A and S2 = I + B, which at I is
    #   ||A - B||_F^2 / 4 (the Lyapunov equation at I has the solution X/2). Wishart entries have
    #   Var(S_ij) = (1 + delta_ij)/(n - 1), so E||A - B||_F^2 = 2 (d^2 + d)/(n - 1).
    #   E[FD] ~ (d^2 + d) / (2(n - 1)) + 2d/n, whose leading term is the d^2/(2n) rule.
    # d=64, n=2000: exact 1.1045, rule 1.024; measured mean of 5 seeds ~1.09 (third-order terms ~-1%).
    d, n = 64, 2000
    observed = np.mean([frechet_distance_features(gaussian(2 * s, n, d), gaussian(2 * s + 1, n, d))
                        for s in range(5)])
    expected = (d * d + d) / (2 * (n - 1)) + 2 * d / n
    assert observed == pytest.approx(expected, rel=0.05)
    assert observed == pytest.approx(d * d / (2 * n), rel=0.15)


def test_fd_rises_monotonically_with_mean_shift_and_scale():
    reference = gaussian(0, 400, 8)
    shifts = [frechet_distance_features(gaussian(1, 400, 8, shift=s), reference) for s in (0.0, 0.25, 0.5, 1, 2)]
    scales = [frechet_distance_features(gaussian(1, 400, 8, scale=s), reference) for s in (1.0, 1.5, 2, 3)]
    assert np.all(np.diff(shifts) > 0) and np.all(np.diff(scales) > 0)
    # a mean shift s on every axis adds d s^2 exactly to the mean term
    assert shifts[-1] - shifts[0] == pytest.approx(8 * 4, rel=0.1)


def test_fd_equals_torchmetrics_and_monai_on_float64_features():
    a, b = correlated(0, 300, 16), correlated(1, 250, 16)
    mu_a, sigma_a = gaussian_statistics(a)
    mu_b, sigma_b = gaussian_statistics(b)
    ours = frechet_distance(mu_a, sigma_a, mu_b, sigma_b)
    torchmetrics_fd = float(_compute_fid(*(torch.from_numpy(x) for x in (mu_a, sigma_a, mu_b, sigma_b))))
    monai_fd = float(FIDMetric()(torch.from_numpy(a), torch.from_numpy(b)))
    assert ours > 1.0
    assert ours == pytest.approx(torchmetrics_fd, rel=1e-6)
    assert ours == pytest.approx(monai_fd, rel=1e-6)
    assert frechet_distance_features(a, b) == pytest.approx(ours, rel=1e-9)


def test_frechet_distance_object_is_batch_size_independent():
    a, b = correlated(0, 100, 6), correlated(1, 90, 6)
    batched, whole = FrechetDistance(num_features=6), FrechetDistance(num_features=6)
    for start in range(0, 100, 7):
        batched.update(torch.from_numpy(a[start:start + 7]), real=False)
    for start in range(0, 90, 7):
        batched.update(b[start:start + 7], real=True)
    whole.update(a, real=False)
    whole.update(b, real=True)
    assert float(batched.compute()) == pytest.approx(float(whole.compute()), rel=1e-9)
    assert float(whole.compute()) == pytest.approx(frechet_distance_features(a, b), rel=1e-9)


def test_frechet_distance_of_singular_covariances_is_finite():
    a, b = correlated(0, 10, 30), correlated(1, 10, 30)  # 10 samples, 30 features: rank-9 covariances
    assert np.isfinite(frechet_distance_features(a, b))


def test_fd_infinity_removes_the_first_sets_bias():
    # Same Gaussian; removing a's bias leaves b's: d/n + (d^2 + d)/(4(n - 1)) = 0.552 (see the FD test above).
    d, n = 64, 2000
    a, b = gaussian(0, n, d), gaussian(1, n, d)
    intercept, slope = fd_infinity(a, b, seed=0, return_slope=True)
    assert abs(intercept) < abs(frechet_distance_features(a, b))
    assert intercept == pytest.approx(d / n + (d * d + d) / (4 * (n - 1)), rel=0.15)
    assert slope == pytest.approx((d * d + d) / 4 + d, rel=0.15)  # a's bias per 1/N
    assert np.isfinite(fd_infinity(a[:40], b, seed=0))  # fewer samples than 2F + 2: still a range of sizes


# ---------------------------------------------------------------------------------------------- kernels
def test_kid_is_zero_within_two_sd_for_identical_distributions_and_positive_for_a_shift():
    # A biased estimator (self-pairs kept) would sit ~2(E k(x,x) - E k(x,y))/m ~ 0.03 above 0 here: > 10 SD.
    a, b = gaussian(0, 2000, 64), gaussian(1, 2000, 64)
    mean, sd = kernel_inception_distance(a, b, subsets=50, subset_size=500, seed=0)
    assert abs(mean) < 2 * sd
    shifted_mean, shifted_sd = kernel_inception_distance(gaussian(2, 2000, 64, shift=0.2), b, subsets=50,
                                                         subset_size=500, seed=0)
    assert shifted_mean > 5 * shifted_sd and shifted_mean > 10 * abs(mean)


def test_kid_equals_torchmetrics_poly_mmd_on_whole_sets():
    a, b = correlated(0, 80, 6), correlated(1, 80, 6)
    mean, sd = kernel_inception_distance(a, b, subset_size=1000)  # capped at 80: both whole sets, once
    assert sd == 0.0
    assert mean == pytest.approx(float(poly_mmd(torch.from_numpy(b), torch.from_numpy(a))), rel=1e-9)
    subset_mean, subset_sd = kernel_inception_distance(a, b, subsets=20, subset_size=40, seed=0)
    assert subset_sd > 0 and subset_mean == pytest.approx(mean, rel=0.5)


def unbiased_rbf_mmd_reference(x: np.ndarray, y: np.ndarray, bandwidth: float) -> float:
    """Textbook unbiased MMD^2 (Gretton et al. 2012, eq. 3), written out with full kernel matrices."""
    def kernel(p, q):
        return np.exp(-cdist(p, q, "sqeuclidean") / (2 * bandwidth**2))

    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    m, n = len(x), len(y)
    return ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
            - 2 * kxy.mean())


def test_rbf_mmd_matches_the_textbook_estimator_and_the_median_heuristic(monkeypatch):
    x, y = correlated(0, 60, 5), correlated(1, 45, 5)
    expected_bandwidth = np.median(pdist(np.concatenate([x, y])))
    assert median_bandwidth(x, y) == pytest.approx(expected_bandwidth, rel=1e-9)
    expected = unbiased_rbf_mmd_reference(x, y, expected_bandwidth)
    assert rbf_mmd(x, y) == pytest.approx(expected, rel=1e-9)
    monkeypatch.setattr(realism, "_BLOCK_ELEMENTS", 50)  # blocks of one row: the blocked sums must agree
    assert rbf_mmd(x, y, bandwidth=2.0) == pytest.approx(unbiased_rbf_mmd_reference(x, y, 2.0), rel=1e-9)


def test_rbf_mmd_is_about_zero_for_identical_distributions_and_positive_for_a_shift():
    same = rbf_mmd(gaussian(0, 1000, 16), gaussian(1, 1000, 16))
    shifted = rbf_mmd(gaussian(2, 1000, 16, shift=0.2), gaussian(1, 1000, 16))
    assert shifted > 0 and abs(same) < 0.05 * shifted


# ------------------------------------------------------------------------------------------- k-NN metrics
def test_coverage_matches_its_closed_form_and_density_is_one_for_identical_distributions():
    # Real point r with k-NN radius among the other N-1 real points is uncovered iff none of the M fake
    # points is nearer than its k-th real neighbour. All N-1+M other points are i.i.d. from one continuous
    # distribution, so the ranks of their distances to r are exchangeable: uncovered iff the k nearest of the
    # N-1+M are all real, probability C(N-1, k)/C(N-1+M, k) = prod_{i=1..k} (N-i)/(N+M-i).
    # Density: a fake point is within r's radius iff it is among r's k nearest of N (N-1 reals + itself),
    # probability k/N, so E[density] = (1/(kM)) * M * N * k/N = 1 exactly.
    n, k = 1000, 5
    expected_coverage = 1 - np.prod([(n - i) / (2 * n - i) for i in range(1, k + 1)])
    density, coverage = density_coverage(gaussian(0, n, 8), gaussian(1, n, 8), k=k)
    assert coverage == pytest.approx(expected_coverage, abs=0.03)
    assert density == pytest.approx(1.0, abs=0.1)


def test_dropping_three_of_ten_modes_lowers_coverage_and_recall_but_not_precision():
    real = ring_of_modes(0, 1000, modes=10)
    all_modes = ring_of_modes(1, 1000, modes=10)
    seven_modes = ring_of_modes(2, 1000, modes=7)
    assert density_coverage(real, all_modes)[1] > 0.9
    assert density_coverage(real, seven_modes)[1] < 0.8
    precision, recall = precision_recall(real, seven_modes)
    full_precision, full_recall = precision_recall(real, all_modes)
    assert precision > 0.9 and full_precision > 0.9
    assert recall < 0.8 < full_recall


def test_manifold_metrics_do_not_depend_on_the_block_size(monkeypatch):
    real, fake = correlated(0, 200, 6), correlated(1, 150, 6) * 0.8
    whole = (precision_recall(real, fake), density_coverage(real, fake))
    monkeypatch.setattr(realism, "_BLOCK_ELEMENTS", 450)  # blocks of 2-3 rows
    assert (precision_recall(real, fake), density_coverage(real, fake)) == whole
    radii = np.sort(cdist(real, real), axis=1)[:, 3]  # 3rd neighbour, column 0 is the point itself
    np.testing.assert_allclose(knn_radii(real, 3), radii, rtol=1e-9)


def test_exact_copies_neither_shrink_the_manifold_nor_leave_it():
    real = gaussian(0, 300, 4)
    duplicated = np.concatenate([real, real, real, real])  # as a bootstrap replicate might draw it
    np.testing.assert_allclose(knn_radii(duplicated, 3), np.tile(knn_radii(real, 3), 4), rtol=1e-9)
    assert precision_recall(real, real[:100] + 1e3) == (0.0, 0.0)
    precision, _ = precision_recall(duplicated, real[:100].copy())
    assert precision == 1.0  # copies lie on the manifold (closed balls)
    assert np.isnan(density_coverage(np.repeat(real[:3], 5, axis=0), real)[0])  # <= k distinct points


def _manifold_by_definition(real: np.ndarray, fake: np.ndarray, k_pr: int, k_dc: int) -> dict[str, float]:
    """Precision/recall and density/coverage written out from their papers on full distance matrices, with each
    radius taken among the set's distinct points (copies neither shrink nor count as neighbours)."""
    def radii(x: np.ndarray, k: int) -> np.ndarray:
        distinct = np.unique(x, axis=0)
        return np.array([np.sort(cdist(row[None], distinct)[0])[k] for row in x])  # [0] is the point itself

    cross = cdist(fake, real)
    real_pr, fake_pr, real_dc = radii(real, k_pr), radii(fake, k_pr), radii(real, k_dc)
    return {"precision": float((cross <= real_pr[None]).any(1).mean()),
            "recall": float((cross <= fake_pr[:, None]).any(0).mean()),
            "density": float((cross <= real_dc[None]).sum() / (k_dc * len(fake))),
            "coverage": float((cross.min(0) <= real_dc).mean())}


def test_manifold_and_kernel_metrics_equal_their_definitions_and_set_metrics_equals_each_function():
    """With repeated rows on both sides (resamples and memorised samples make them), from the papers' formulas on
    full distance matrices; ``set_metrics``, the fused pass the scorecard uses, equals the separate functions."""
    rng = np.random.default_rng(5)
    real = np.concatenate([correlated(0, 150, 6), correlated(0, 150, 6)[:20]])  # 20 real images twice
    fake = np.concatenate([correlated(1, 60, 6) * 0.9, real[:5]])  # 5 copies of training images
    fake = fake[rng.permutation(len(fake))]
    expected = _manifold_by_definition(real, fake, 3, 5)
    precision, recall = precision_recall(real, fake, k=3)
    density, coverage = density_coverage(real, fake, k=5)
    separate = {"precision": precision, "recall": recall, "density": density, "coverage": coverage}
    for name, value in expected.items():
        assert separate[name] == pytest.approx(value, abs=1e-12), name
    bandwidth = median_bandwidth(fake, real)
    fused = set_metrics(fake, real, bandwidth, precision_k=3, density_k=5, kid_subsets=5, seed=2)
    separate |= {"frechet_distance": frechet_distance_features(fake, real),
                 "kid": kernel_inception_distance(fake, real, subsets=5, seed=2)[0],
                 "rbf_mmd": rbf_mmd(fake, real, bandwidth=bandwidth)}
    assert fused.keys() == separate.keys()
    for name, value in separate.items():
        assert fused[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name
    assert fused["rbf_mmd"] == pytest.approx(unbiased_rbf_mmd_reference(fake, real, bandwidth), rel=1e-9)


def test_feature_set_metric_objects_match_the_functions():
    real, fake = correlated(0, 120, 5), correlated(1, 100, 5)
    objects = [KernelInceptionDistance(subsets=5, subset_size=50), RBFMaximumMeanDiscrepancy(),
               PrecisionRecall(k=3), DensityCoverage(k=5)]
    for metric in objects:
        for start in range(0, 120, 7):
            metric.update(real[start:start + 7], real=True)
        for start in range(0, 100, 7):
            metric.update(torch.from_numpy(fake[start:start + 7]), real=False)
    kid, rbf, pr, dc = (metric.compute() for metric in objects)
    assert tuple(float(v) for v in kid) == kernel_inception_distance(fake, real, subsets=5, subset_size=50)
    assert float(rbf) == rbf_mmd(fake, real)
    assert tuple(float(v) for v in pr) == precision_recall(real, fake, k=3)
    assert tuple(float(v) for v in dc) == density_coverage(real, fake, k=5)


# ---------------------------------------------------------------------------------------------- MS-SSIM
def test_ms_ssim_scales_fit_small_images():
    assert ms_ssim_scales(256) == (11, (0.0448, 0.2856, 0.3001, 0.2363, 0.1333))
    kernel, weights = ms_ssim_scales(64)
    assert kernel == 3 and len(weights) == 5
    kernel, weights = ms_ssim_scales(32)
    assert kernel == 3 and len(weights) == 4 and sum(weights) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="too small"):
        ms_ssim_scales(2)


@pytest.mark.parametrize("shape", [(64, 64), (32, 32, 32)])
def test_ms_ssim_diversity_is_one_for_identical_images_and_low_for_noise(shape):
    rng = np.random.default_rng(0)
    noise = rng.uniform(-1, 1, (5, *shape)).astype(np.float32)
    identical = np.repeat(noise[:1], 5, axis=0)
    similar = 0.8 * identical + 0.2 * noise
    n_pairs = 10 if len(shape) == 2 else 4
    assert ms_ssim_diversity(identical, n_pairs=n_pairs) == pytest.approx(1.0, abs=1e-5)
    assert ms_ssim_diversity(noise, n_pairs=n_pairs) < 0.3
    assert 0.3 < ms_ssim_diversity(similar, n_pairs=n_pairs) < 1.0


def test_random_pairs_are_distinct_and_capped():
    pairs = random_pairs(5, 100, seed=0)
    assert len(pairs) == 10 and (pairs[:, 0] < pairs[:, 1]).all() and len({tuple(p) for p in pairs}) == 10
    assert len(random_pairs(50, 30, seed=1)) == 30


def test_ms_ssim_comparison_flags_a_collapsed_generator():
    rng = np.random.default_rng(1)
    real = rng.uniform(-1, 1, (12, 64, 64)).astype(np.float32)
    collapsed = (0.8 * real[:1] + 0.2 * rng.uniform(-1, 1, (12, 64, 64))).astype(np.float32)
    result = ms_ssim_diversity_comparison(collapsed, real, None, [f"p{i // 2}" for i in range(12)], n_boot=50)
    assert result["n"] == 12 and result["kernel_size"] == 3 and result["scales"] == 5
    assert result["synthetic"].ci_low > result["real"].ci_high
    first, second = np.triu_indices(12, k=1)
    all_pairs = ms_ssim_pairs(real, np.stack([first, second], axis=1))
    assert result["real"].value == pytest.approx(all_pairs.mean(), rel=1e-9)


# ----------------------------------------------------------------------------------------- real floor
def patients(prefix: str, n: int, per_patient: int = 2) -> list[str]:
    return [f"{prefix}{i // per_patient}" for i in range(n)]


def test_real_floor_overlaps_a_perfect_generator_and_is_exceeded_by_a_shifted_one():
    train, unseen = gaussian(0, 400, 8), gaussian(1, 200, 8)
    same, shifted = gaussian(2, 300, 8), gaussian(3, 300, 8, shift=0.3)
    kwargs = {"train_groups": patients("t", 400), "unseen_groups": patients("u", 200), "n_boot": 60, "seed": 0}
    perfect = with_real_floor(frechet_distance_features, same, train, unseen, None, **kwargs)
    assert perfect["n"] == 200 and perfect["n_reference"] == 400
    synthetic, floor = perfect["synthetic"], perfect["real_floor"]
    assert synthetic.ci_low <= floor.ci_high and floor.ci_low <= synthetic.ci_high
    assert floor.n_boot == 60 and synthetic.n_boot == 60
    bad = with_real_floor(frechet_distance_features, shifted[:250], train, unseen, None, **kwargs)
    assert bad["synthetic"].value > bad["real_floor"].ci_high
    assert bad["real_floor"].value == floor.value  # the floor does not depend on the synthetic set


def test_real_floor_of_knn_metrics_survives_bootstrap_duplicates():
    train, unseen, same = gaussian(0, 150, 4), gaussian(1, 100, 4), gaussian(2, 100, 4)

    def coverage(x: np.ndarray, reference: np.ndarray) -> float:
        return density_coverage(reference, x)[1]

    result = with_real_floor(coverage, same, train, unseen, None, patients("t", 150), patients("u", 100),
                             n_boot=30, seed=0)
    for estimate in (result["synthetic"], result["real_floor"]):
        assert estimate.n_boot == 30 and 0.5 < estimate.ci_low <= estimate.ci_high <= 1.0


@pytest.mark.parametrize("n_a, n_b, dim", [(20, 180, 96), (400, 300, 16), (3, 5, 10)])
def test_fd_from_covariance_factors_equals_the_matrix_square_root_formula(n_a, n_b, dim):
    rng = np.random.default_rng(dim)
    a, b = rng.normal(size=(n_a, dim)), rng.normal(0.3, 1.5, size=(n_b, dim))
    expected = realism.frechet_distance(*realism.gaussian_statistics(a), *realism.gaussian_statistics(b))
    # The sqrtm route adds 1e-6 to singular covariances' diagonals; the factor route needs no offset.
    assert realism.frechet_distance_features(a, b) == pytest.approx(expected, rel=1e-6, abs=1e-4)


def test_a_real_geometry_computed_once_gives_the_same_metrics_and_survives_packing():
    """The training half's side of ``set_metrics`` computed once (and read back from the real-side cache) scores
    every fake set exactly as the arrays would; with repeats on both sides."""
    rng = np.random.default_rng(3)
    real = np.concatenate([correlated(0, 120, 6), correlated(0, 120, 6)[:10]])
    fakes = [np.concatenate([correlated(1, 40, 6), real[:3]]), correlated(2, 25, 6) * 1.3]
    bandwidth = median_bandwidth(fakes[0], real)
    halves = [np.sort(rng.choice(len(real), 70, replace=False)) for _ in range(3)]
    geometries = [realism.RealGeometry.of(real, (3, 5), bandwidth, rows) for rows in halves]
    restored = realism.unpack(realism.pack(geometries), real, halves, bandwidth)
    for fake in fakes:
        for rows, geometry, again in zip(halves, geometries, restored):
            expected = set_metrics(fake, real[rows], bandwidth, seed=4)
            assert set_metrics(fake, geometry, bandwidth, seed=4) == expected
            assert set_metrics(fake, again, bandwidth, seed=4) == expected
        assert set_metrics(fake, real, bandwidth, seed=4)["frechet_distance"] == pytest.approx(
            frechet_distance_features(fake, real), rel=1e-9)
    with pytest.raises(ValueError, match="bandwidth"):
        set_metrics(fakes[0], geometries[0], bandwidth * 2)
    # Asking for fewer metrics skips their passes and leaves the others unchanged.
    everything = set_metrics(fakes[1], geometries[0], bandwidth, seed=4)
    assert set_metrics(fakes[1], geometries[0], bandwidth, seed=4, only=["coverage", "frechet_distance"]) == {
        "coverage": everything["coverage"], "frechet_distance": everything["frechet_distance"]}


def test_with_real_floor_compares_both_sides_with_the_same_training_rows():
    """Each set has its own random stream: the synthetic value and the floor see the same training halves, the ones
    ``training_rows`` lists, so their geometry is computed once."""
    train, unseen, synthetic = correlated(0, 90, 4), correlated(1, 40, 4), correlated(2, 30, 4)
    groups = [f"p{i // 2}" for i in range(90)]
    asked: list[bytes] = []

    def reference(rows):
        asked.append(np.asarray(rows).tobytes())
        return train[rows]

    realism.with_real_floor(lambda a, b: float(a.mean() - b.mean()), synthetic, train, unseen, None, groups,
                            [f"u{i}" for i in range(40)], n_boot=12, seed=7, reference=reference)
    expected = [rows.tobytes() for rows in realism.training_rows(groups, 12, 7)]
    assert asked == expected + expected  # the floor, then the synthetic side

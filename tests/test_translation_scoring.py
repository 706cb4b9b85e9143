"""Pixel truth of translations: known answers for identical, noisy and unrelated images; intervals hold their value."""

from __future__ import annotations

import numpy as np
import pytest

from radsynth.generators.losses import PSNR_CAP_DB
from radsynth.pipelines.scoring.translation import pixel_truth

SHAPES = {2: (32, 32), 3: (16, 16, 16)}


def smooth_images(n: int, shape, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    images = [np.tanh(sum(g * rng.normal() for g in grids) + rng.normal()) * 0.8 for _ in range(n)]
    return np.stack(images).astype(np.float32)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_identical_images_score_perfect_and_gaussian_noise_gives_its_known_psnr(spatial_dims):
    truth = smooth_images(12, SHAPES[spatial_dims])
    ids = [f"case{i}" for i in range(12)]
    same = pixel_truth(truth, truth, ids, n_boot=50)
    assert same["ssim"].value == pytest.approx(1.0, abs=1e-5) and same["psnr"].value == pytest.approx(PSNR_CAP_DB)

    sigma = 0.05
    noisy = truth + np.random.default_rng(1).normal(0, sigma, truth.shape).astype(np.float32)
    scored = pixel_truth(noisy, truth, ids, n_boot=200)
    expected = 20 * np.log10(2.0) - 10 * np.log10(sigma**2)  # data range 2, MSE sigma^2
    assert scored["psnr"].value == pytest.approx(expected, abs=0.3)
    assert 0.5 < scored["ssim"].value < 0.99
    for name in ("ssim", "psnr"):
        estimate = scored[name]
        assert estimate.ci_low <= estimate.value <= estimate.ci_high and estimate.ci_high > estimate.ci_low
    unrelated = pixel_truth(smooth_images(12, SHAPES[spatial_dims], seed=5), truth, ids, n_boot=50)
    assert unrelated["ssim"].value < scored["ssim"].value and unrelated["psnr"].value < scored["psnr"].value


def test_images_and_truth_of_different_shapes_are_refused():
    with pytest.raises(ValueError, match="differ in shape"):
        pixel_truth(np.zeros((2, 8, 8)), np.zeros((3, 8, 8)), ["a", "b"])

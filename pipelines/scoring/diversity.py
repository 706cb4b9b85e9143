"""Diversity within a set of images: mean MS-SSIM over pairs of distinct images (lower = more diverse).

A generator that collapses onto a few outputs gives synthetic pairs that look alike; the number to read is the
synthetic-pairs value next to the real-pairs value of the same size (``ms_ssim_diversity_comparison``).
Computed with MONAI's ``MultiScaleSSIMMetric`` in 2D or 3D (from the array's ndim) on images in [-1, 1].

MS-SSIM halves the image once per scale and filters each scale with a ``kernel_size`` window without padding,
so the default (5 scales, kernel 11) needs about 176 pixels per side. ``ms_ssim_scales`` derives a kernel and
a number of scales from the smallest side instead: 64 x 64 gets kernel 3 over 5 scales, 32^3 kernel 3 over 4.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import MultiScaleSSIMMetric

from radsynth.pipelines.scoring.bootstrap import Estimate, bootstrap

__all__ = ["ms_ssim_diversity", "ms_ssim_diversity_comparison", "ms_ssim_pairs", "ms_ssim_scales", "random_pairs"]

# Wang et al. 2003 scale weights, finest first; fewer scales keep the finest ones, renormalised to sum 1.
_SCALE_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
_KERNEL_SIZES = (11, 7, 5, 3)


def _fits(side: int, kernel_size: int, scales: int) -> bool:
    """Whether ``scales`` scales with this kernel survive on ``side`` pixels.

    Two conditions: the coarsest scale (side halved scales - 1 times) still holds one whole window, and
    MONAI's own guard (side // (scales - 1)^2 > kernel_size - 1), which is stricter at 3-4 scales.
    """
    return side // 2 ** (scales - 1) >= kernel_size and side // max(1, scales - 1) ** 2 > kernel_size - 1


def ms_ssim_scales(smallest_side: int, kernel_size: int | None = None) -> tuple[int, tuple[float, ...]]:
    """(kernel_size, scale weights) for images whose smallest side is ``smallest_side``.

    kernel_size None: the largest of 11, 7, 5, 3 that fits all 5 scales, else 3 (small kernels lose little;
    dropping scales loses the coarse structure). Then as many scales (at most 5) as the side allows.
    """
    if kernel_size is None:
        kernel_size = next((k for k in _KERNEL_SIZES if _fits(smallest_side, k, len(_SCALE_WEIGHTS))), 3)
    scales = next((s for s in range(len(_SCALE_WEIGHTS), 0, -1) if _fits(smallest_side, kernel_size, s)), 0)
    if scales == 0:
        raise ValueError(f"images with a side of {smallest_side} are too small for MS-SSIM with kernel "
                         f"{kernel_size}")
    if scales == len(_SCALE_WEIGHTS):
        return kernel_size, _SCALE_WEIGHTS
    weights = np.asarray(_SCALE_WEIGHTS[:scales])
    return kernel_size, tuple(float(w) for w in weights / weights.sum())


def random_pairs(n: int, n_pairs: int, seed: int = 0) -> np.ndarray:
    """(P, 2) index pairs i < j of distinct images, P = min(n_pairs, n(n-1)/2), drawn without replacement."""
    if n < 2:
        raise ValueError(f"pairs need at least 2 images, got {n}")
    first, second = np.triu_indices(n, k=1)
    chosen = np.random.default_rng(seed).choice(len(first), min(n_pairs, len(first)), replace=False)
    return np.stack([first[chosen], second[chosen]], axis=1)


def _spatial(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images, dtype=np.float32)
    if images.ndim not in (3, 4):
        raise ValueError(f"expected (N, H, W) or (N, D, H, W) images, got shape {images.shape}")
    return images


def ms_ssim_pairs(images: np.ndarray, pairs: np.ndarray, data_range: float = 2.0, kernel_size: int | None = None,
                  batch_size: int = 64) -> np.ndarray:
    """MS-SSIM of each (i, j) pair of ``images`` ((N, H, W) or (N, D, H, W)), as a float64 array."""
    images = _spatial(images)
    spatial_dims = images.ndim - 1
    kernel_size, weights = ms_ssim_scales(min(images.shape[1:]), kernel_size)
    metric = MultiScaleSSIMMetric(spatial_dims=spatial_dims, data_range=data_range, kernel_size=kernel_size,
                                  weights=weights, reduction="none")
    tensor = torch.from_numpy(images)[:, None]
    values = []
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            block = pairs[start:start + batch_size]
            values.append(metric(y_pred=tensor[block[:, 0]], y=tensor[block[:, 1]]).reshape(-1))
    metric.reset()
    return torch.cat(values).double().numpy() if values else np.zeros(0)


def ms_ssim_diversity(images: np.ndarray, data_range: float = 2.0, n_pairs: int = 500, seed: int = 0,
                      kernel_size: int | None = None) -> float:
    """Mean MS-SSIM over up to ``n_pairs`` random pairs of distinct images of one set (1 = all identical).

    data_range: 2.0 for images in [-1, 1]. kernel_size None: derived from the smallest side (``ms_ssim_scales``).
    """
    images = _spatial(images)
    return float(ms_ssim_pairs(images, random_pairs(len(images), n_pairs, seed), data_range, kernel_size).mean())


def _pair_bootstrap(images: np.ndarray, groups: Sequence[str], data_range: float, kernel_size: int,
                    n_boot: int, seed: int) -> Estimate:
    """Mean MS-SSIM over all pairs of ``images`` with a patient-level bootstrap CI.

    The matrix of all pairwise values is computed once; a replicate that draws image i w_i times weights the
    pair (i, j) by w_i w_j. Pairs of an image with its own copy are left out: they are bootstrap artefacts,
    not evidence of collapse.
    """
    n = len(images)
    first, second = np.triu_indices(n, k=1)
    values = ms_ssim_pairs(images, np.stack([first, second], axis=1), data_range, kernel_size)

    def mean_over_pairs(rows: np.ndarray) -> float:
        weights = np.bincount(rows, minlength=n).astype(np.float64)
        pair_weights = weights[first] * weights[second]
        total = pair_weights.sum()
        return float(pair_weights @ values / total) if total > 0 else float("nan")

    return bootstrap(mean_over_pairs, [list(groups)], n_boot=n_boot, seed=seed)


def ms_ssim_diversity_comparison(synthetic: np.ndarray, real: np.ndarray, synthetic_groups: Sequence[str] | None,
                                 real_groups: Sequence[str], max_images: int = 64, data_range: float = 2.0,
                                 kernel_size: int | None = None, n_boot: int = 200, seed: int = 0) -> dict:
    """Mean pairwise MS-SSIM of synthetic images next to that of real images, same n, same kernel and scales.

    n = min(len(synthetic), len(real), max_images) images are drawn from each set (seeded) and all their
    n(n-1)/2 pairs are scored; each mean has a patient-level bootstrap CI (synthetic samples are their own
    unit when ``synthetic_groups`` is None). Synthetic clearly above real = less diverse than real data.
    Returns {"synthetic": Estimate, "real": Estimate, "n": n, "kernel_size": k, "scales": s}.
    """
    synthetic, real = _spatial(synthetic), _spatial(real)
    if synthetic.shape[1:] != real.shape[1:]:
        raise ValueError(f"image shapes differ: synthetic {synthetic.shape[1:]} vs real {real.shape[1:]}")
    if synthetic_groups is None:
        synthetic_groups = [f"synthetic-{i}" for i in range(len(synthetic))]
    kernel_size, weights = ms_ssim_scales(min(real.shape[1:]), kernel_size)
    n = min(len(synthetic), len(real), max_images)
    rng = np.random.default_rng(seed)
    estimates = {}
    for name, images, groups in (("synthetic", synthetic, synthetic_groups), ("real", real, real_groups)):
        chosen = np.sort(rng.choice(len(images), n, replace=False))
        estimates[name] = _pair_bootstrap(images[chosen], [groups[i] for i in chosen], data_range, kernel_size,
                                          n_boot, seed)
    return {**estimates, "n": n, "kernel_size": kernel_size, "scales": len(weights)}

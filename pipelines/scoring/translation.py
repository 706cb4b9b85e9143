"""Pixel truth of a translation: each translated image against the same case rendered in the target modality.

Only paired data can say how close a translation is to the image the target scanner would have made (the
built-in torso phantoms render one anatomy as CT and as MRI; real paired CT/MR of one patient is rare and never
aligned voxel for voxel). Per sample: SSIM (MONAI's, Gaussian window shrunk to fit) and PSNR over the normalised
[-1, 1] range, in the space both images were preprocessed to; the mean of each with a bootstrap over source cases.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import SSIMMetric

from radsynth.generators.losses import PSNR_CAP_DB, ssim_window

from .bootstrap import Estimate, bootstrap

__all__ = ["pixel_truth", "per_image_psnr", "per_image_ssim"]

DATA_RANGE = 2.0  # images in [-1, 1]


def per_image_psnr(images: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """PSNR (dB) of each image (N, *spatial) against its truth, capped at ``PSNR_CAP_DB`` for identical ones."""
    squared = ((np.asarray(images, np.float64) - np.asarray(truth, np.float64)) ** 2).reshape(len(images), -1).mean(1)
    floor = (DATA_RANGE * 10 ** (-PSNR_CAP_DB / 20)) ** 2
    return 20 * np.log10(DATA_RANGE) - 10 * np.log10(np.maximum(squared, floor))


def per_image_ssim(images: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """SSIM of each image (N, *spatial) against its truth."""
    spatial = tuple(np.asarray(images).shape[1:])
    metric = SSIMMetric(spatial_dims=len(spatial), data_range=DATA_RANGE, win_size=ssim_window(spatial))
    as_tensor = [torch.as_tensor(np.asarray(a, np.float32))[:, None] for a in (images, truth)]
    return metric(*as_tensor).reshape(-1).numpy().astype(np.float64)


def pixel_truth(images: np.ndarray, truth: np.ndarray, groups: Sequence[str], n_boot: int = 200,
                seed: int = 0) -> dict[str, Estimate | np.ndarray]:
    """{"ssim", "psnr"}: means over the images with a bootstrap over ``groups`` (each image's source case);
    {"ssim_per_image", "psnr_per_image"} beside them."""
    if np.asarray(images).shape != np.asarray(truth).shape:
        raise ValueError(f"images {np.asarray(images).shape} and truth {np.asarray(truth).shape} differ in shape")
    values = {"ssim": per_image_ssim(images, truth), "psnr": per_image_psnr(images, truth)}
    result: dict[str, Estimate | np.ndarray] = {}
    for name, per_image in values.items():
        result[name] = bootstrap(lambda rows, v=per_image: float(v[rows].mean()), [list(groups)], n_boot, seed)
        result[f"{name}_per_image"] = per_image
    return result

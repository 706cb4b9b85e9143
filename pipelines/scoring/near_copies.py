"""Near copies of training images: the positives that copy detection is calibrated and tested on.

A generator that memorises does not return its training images bit for bit; it returns them with a little noise,
mirrored, moved by a pixel or two, or with a different contrast curve. These perturbations make such copies from
real images (2D or 3D, values in [-1, 1]) so that a detector's threshold can be set at a known recall. Copies that
need a model (autoencoder round trip, partial-noise regeneration) are made by the generator probes.
"""

from __future__ import annotations

import numpy as np

__all__ = ["NEAR_COPY_KINDS", "near_copies", "shift_with_edge"]

NEAR_COPY_KINDS = ("noise", "flip", "shift", "gamma", "flip_shift")


def shift_with_edge(image: np.ndarray, offsets: tuple[int, ...]) -> np.ndarray:
    """``image`` moved by ``offsets`` pixels per axis; the uncovered border repeats the edge (no wrap-around)."""
    width = [(max(o, 0), max(-o, 0)) for o in offsets]
    padded = np.pad(image, width, mode="edge")
    window = tuple(slice(after, after + n) for (_, after), n in zip(width, image.shape))
    return padded[window]


def _random_offsets(rng: np.random.Generator, spatial_dims: int, max_shift: int) -> tuple[int, ...]:
    """Offsets in [-max_shift, max_shift] per axis, not all zero (a copy that did not move tests nothing)."""
    while True:
        offsets = tuple(int(v) for v in rng.integers(-max_shift, max_shift + 1, size=spatial_dims))
        if any(offsets):
            return offsets


def near_copies(images: np.ndarray, kind: str, seed: int = 0, *, noise_sd: float = 0.05, max_shift: int = 2,
                gamma_range: tuple[float, float] = (0.7, 1.4), flip_axis: int = -1) -> np.ndarray:
    """One near copy of every image in ``images`` (N, *spatial), float32 in [-1, 1].

    kind: ``noise`` (gaussian, SD ``noise_sd`` on the [-1, 1] scale), ``flip`` (mirror along spatial axis
        ``flip_axis``; -1 is left-right for an (H, W) radiograph), ``shift`` (1..``max_shift`` pixels along random
        axes, edge repeated), ``gamma`` (contrast curve with gamma drawn log-uniformly in ``gamma_range``),
        ``flip_shift`` (mirror, then shift).
    """
    if kind not in NEAR_COPY_KINDS:
        raise ValueError(f"kind must be one of {NEAR_COPY_KINDS}, got {kind!r}")
    rng = np.random.default_rng(seed)
    images = np.asarray(images, dtype=np.float32)
    spatial_dims = images.ndim - 1
    axis = 1 + (flip_axis % spatial_dims)
    if kind == "noise":
        copies = images + rng.normal(0.0, noise_sd, size=images.shape).astype(np.float32)
    elif kind == "gamma":
        gammas = np.exp(rng.uniform(*np.log(gamma_range), size=(len(images),) + (1,) * spatial_dims))
        copies = ((images + 1.0) / 2.0).clip(0.0, 1.0) ** gammas * 2.0 - 1.0
    else:
        copies = np.flip(images, axis=axis) if kind in ("flip", "flip_shift") else images
        if kind != "flip":
            copies = np.stack([shift_with_edge(c, _random_offsets(rng, spatial_dims, max_shift)) for c in copies])
    return np.ascontiguousarray(np.clip(copies, -1.0, 1.0), dtype=np.float32)

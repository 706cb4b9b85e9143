"""Dimension-generic drawing helpers for the procedural phantoms: ellipsoids, irregular blobs, smooth noise.

Everything here works in array-index units on any number of axes, so the 2D radiograph and the 3D volumes
share one code path. Shapes are evaluated on their own bounding box only, so a 5 mm lesion costs as much as
the lesion, not as much as the volume it sits in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from scipy import ndimage

Box = tuple[slice, ...]
Key = TypeVar("Key")


def rotation_2d(angle: float) -> np.ndarray:
    """Counter-clockwise rotation of the (row, column) plane by ``angle`` radians."""
    cos, sin = math.cos(angle), math.sin(angle)
    return np.array([[cos, -sin], [sin, cos]])


def rotation_3d(angles: Sequence[float]) -> np.ndarray:
    """Rotation about axis 0, then axis 1, then axis 2, by the given angles in radians."""
    matrix = np.eye(3)
    for axis, angle in enumerate(angles):
        plane = [a for a in range(3) if a != axis]
        step = np.eye(3)
        step[np.ix_(plane, plane)] = rotation_2d(angle)
        matrix = step @ matrix
    return matrix


@dataclass(frozen=True)
class Ellipsoid:
    """An ellipse (2D) or ellipsoid (3D) in array-index units.

    ``axes`` holds the semi-axis vectors as columns, so one matrix carries size, rotation and the grid's
    voxel aspect: a sphere described in millimetres stays a sphere on an anisotropic grid.
    """

    center: tuple[float, ...]
    axes: np.ndarray

    @classmethod
    def from_radii(
        cls, center: Sequence[float], radii: Sequence[float], rotation: np.ndarray | None = None
    ) -> Ellipsoid:
        """Radii along the ellipsoid's own axes, which ``rotation`` turns into the array's (index units)."""
        axes = np.diag(np.asarray(radii, dtype=float))
        if rotation is not None:
            axes = rotation @ axes
        return cls(tuple(float(c) for c in center), axes)

    @classmethod
    def from_millimetres(
        cls,
        center: Sequence[float],
        radii_mm: Sequence[float],
        spacing: Sequence[float],
        rotation: np.ndarray | None = None,
    ) -> Ellipsoid:
        """Radii in millimetres around an index-space centre; rotation acts in millimetres, so it stays rigid."""
        unit = cls.from_radii(np.zeros(len(center)), radii_mm, rotation)
        return cls(tuple(float(c) for c in center), np.diag(1.0 / np.asarray(spacing, dtype=float)) @ unit.axes)

    @property
    def ndim(self) -> int:
        return len(self.center)

    @property
    def radii(self) -> np.ndarray:
        """Semi-axis lengths in index units."""
        return np.linalg.norm(self.axes, axis=0)

    def scaled(self, factor: float, about: Sequence[float] | None = None) -> Ellipsoid:
        """Grow or shrink by ``factor``; with ``about``, the centre moves towards or away from that point too."""
        center = np.asarray(self.center, dtype=float)
        if about is not None:
            anchor = np.asarray(about, dtype=float)
            center = anchor + factor * (center - anchor)
        return Ellipsoid(tuple(center), self.axes * factor)

    def stretched(self, factors: Sequence[float]) -> Ellipsoid:
        """Scale each of the ellipsoid's own axes by its factor, keeping the centre."""
        return Ellipsoid(self.center, self.axes * np.asarray(factors, dtype=float))

    def half_extent(self) -> np.ndarray:
        """Half the side of the axis-aligned box that holds the ellipsoid, per array axis."""
        return np.sqrt((self.axes**2).sum(axis=1))

    def box(self, shape: Sequence[int], margin: float = 1.0) -> Box:
        """The index box holding the ellipsoid grown by ``margin`` (in radii), clipped to the array."""
        extent = self.half_extent() * margin + 1.0
        center = np.asarray(self.center, dtype=float)
        low = np.clip(np.floor(center - extent).astype(int), 0, shape)
        high = np.clip(np.ceil(center + extent).astype(int) + 1, 0, shape)
        return tuple(slice(int(a), int(b)) for a, b in zip(low, high))

    def radius(self, shape: Sequence[int], margin: float = 1.0) -> tuple[Box, np.ndarray]:
        """Normalised radius over the bounding box: 0 at the centre, 1 on the surface, > 1 outside."""
        box = self.box(shape, margin)
        offsets = _offsets(box, self.center)
        to_unit = np.linalg.inv(self.axes).astype(np.float32)
        # Coordinates in the unit-ball frame, written out per axis so that open grids broadcast.
        squared = sum(sum(to_unit[j, k] * offsets[k] for k in range(self.ndim)) ** 2 for j in range(self.ndim))
        return box, np.sqrt(np.broadcast_to(squared, _box_shape(box)))

    def mask(self, shape: Sequence[int]) -> np.ndarray:
        box, radius = self.radius(shape)
        return place(shape, box, radius <= 1.0)

    def thickness(self, shape: Sequence[int]) -> tuple[Box, np.ndarray]:
        """The chord length through the ellipsoid along a projection ray, relative to the centre's (0..1).

        Summing these per organ is what makes the 2D radiograph look projected rather than painted.
        """
        box, radius = self.radius(shape)
        return box, np.sqrt(np.clip(1.0 - radius**2, 0.0, None))


def _offsets(box: Box, center: Sequence[float]) -> list[np.ndarray]:
    """Per-axis distances from the centre, shaped to broadcast over the box (an open grid)."""
    grids = np.ogrid[box]
    return [grid.astype(np.float32) - np.float32(c) for grid, c in zip(grids, center)]


def _box_shape(box: Box) -> tuple[int, ...]:
    return tuple(s.stop - s.start for s in box)


def place(shape: Sequence[int], box: Box, values: np.ndarray) -> np.ndarray:
    """A full-size array that is zero (or False) except for ``values`` at ``box``."""
    full = np.zeros(tuple(shape), dtype=values.dtype)
    full[box] = values
    return full


def smooth_noise(rng: np.random.Generator, shape: Sequence[int], correlation: float) -> np.ndarray:
    """Zero-mean, unit-variance noise whose features are about ``correlation`` samples across (float32).

    White noise on a coarse lattice, spread onto the grid with Gaussian weights one axis at a time (small
    matrix products): the same look as blurring full-resolution noise with a wide kernel, at a fraction of
    the cost, and smooth (no interpolation creases).
    """
    step = max(float(correlation), 1.0)
    shape = tuple(int(n) for n in shape)
    field = rng.standard_normal(tuple(math.ceil(n / step) + 3 for n in shape)).astype(np.float32)
    for axis, n in enumerate(shape):
        weights = _spreading_weights(n, field.shape[axis], step)
        field = np.moveaxis(np.tensordot(weights, field, axes=([1], [axis])), 0, axis)
    return (field - field.mean()) / max(float(field.std()), 1e-6)


def _spreading_weights(n: int, nodes: int, step: float) -> np.ndarray:
    """(n, nodes) Gaussian weights from lattice nodes (one beyond each end) to samples, unit norm per row."""
    samples = np.arange(n, dtype=np.float32) + 0.5
    node_positions = (np.arange(nodes, dtype=np.float32) - 1.0) * np.float32(step)
    weights = np.exp(-0.5 * ((samples[:, None] - node_positions[None, :]) / np.float32(0.6 * step)) ** 2)
    return weights / np.sqrt((weights**2).sum(axis=1, keepdims=True))


def blob_mask(
    rng: np.random.Generator, shape: Sequence[int], ellipsoid: Ellipsoid, irregularity: float = 0.2
) -> np.ndarray:
    """An ellipsoid whose surface is pushed in and out by smooth noise: lesions are rarely perfect spheres.

    The centre voxel is always inside (the radius there is 0 and the bumps are bounded by ``irregularity``
    < 1), so a drawn lesion is never empty.
    """
    margin = 1.0 + irregularity
    box, radius = ellipsoid.radius(shape, margin)
    bumps = np.tanh(smooth_noise(rng, radius.shape, correlation=max(2.0, float(ellipsoid.radii.min()) * 0.7)))
    return place(shape, box, radius <= 1.0 + irregularity * bumps)


def gaussian_blur(array: np.ndarray, sigma: float | Sequence[float]) -> np.ndarray:
    """Gaussian smoothing with a short kernel (3 sigma): phantoms need the look, not the last decimal."""
    if np.all(np.asarray(sigma) <= 0):
        return array
    return ndimage.gaussian_filter(array, sigma, truncate=3.0, mode="nearest")


def choose(rng: np.random.Generator, frequencies: Mapping[Key, float]) -> Key:
    """One key drawn with probability proportional to its frequency."""
    names = list(frequencies)
    weights = np.array([frequencies[name] for name in names], dtype=float)
    return names[int(rng.choice(len(names), p=weights / weights.sum()))]


def log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    """A size drawn evenly on a log scale: small lesions are as common as large ones per doubling of size."""
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def pick_voxel(rng: np.random.Generator, mask: np.ndarray) -> tuple[int, ...]:
    """A uniformly random index where ``mask`` is True (the mask must not be empty)."""
    flat = np.flatnonzero(mask)
    if flat.size == 0:
        raise ValueError("cannot pick a voxel from an empty mask")
    return tuple(int(i) for i in np.unravel_index(flat[rng.integers(flat.size)], mask.shape))


def equivalent_diameter_mm(mask: np.ndarray, spacing: Sequence[float]) -> float:
    """Diameter of the circle (2D) or sphere (3D) with the mask's area or volume: the size a report quotes."""
    measure = float(mask.sum()) * float(np.prod(spacing))
    if mask.ndim == 2:
        return 2.0 * math.sqrt(measure / math.pi)
    return 2.0 * (3.0 * measure / (4.0 * math.pi)) ** (1.0 / 3.0)


def normalised_grid(shape: Sequence[int]) -> list[np.ndarray]:
    """Open-grid coordinates in [-1, 1] per axis (pixel centres), float32, broadcastable to ``shape``."""
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    return [((grid + 0.5) / n * 2.0 - 1.0).astype(np.float32) for grid, n in zip(grids, shape)]


def to_index(point: Sequence[float], shape: Sequence[int]) -> tuple[float, ...]:
    """A point in normalised [-1, 1] coordinates as fractional array indices."""
    return tuple((p + 1.0) * 0.5 * n - 0.5 for p, n in zip(point, shape))


def to_index_lengths(lengths: Sequence[float], shape: Sequence[int]) -> tuple[float, ...]:
    """Lengths in normalised units (1 = half the field of view) as lengths in array indices."""
    return tuple(length * 0.5 * n for length, n in zip(lengths, shape))


def ellipsoid_in_unit_frame(
    shape: Sequence[int], center: Sequence[float], radii: Sequence[float], rotation: np.ndarray | None = None
) -> Ellipsoid:
    """An ``Ellipsoid`` described in normalised [-1, 1] coordinates, placed on a grid of ``shape``.

    Anatomy is easiest to describe relative to the field of view. The phantoms' fields of view are equal on
    every axis, so the normalised frame is isotropic in millimetres and the rotation is applied there, before
    the grid's (possibly unequal) samples per axis stretch it into index units.
    """
    to_index_scale = np.diag(to_index_lengths(np.ones(len(shape)), shape))
    unit = Ellipsoid.from_radii(np.zeros(len(shape)), radii, rotation)
    return Ellipsoid(to_index(center, shape), to_index_scale @ unit.axes)


def random_rotation(rng: np.random.Generator, ndim: int) -> np.ndarray:
    """A random orientation for a lesion (not uniform on SO(3); lesions only need to not all line up)."""
    if ndim == 2:
        return rotation_2d(rng.uniform(0.0, math.pi))
    return rotation_3d(rng.uniform(0.0, math.pi, size=3))


def interior_voxels(mask: np.ndarray, spacing: Sequence[float], depth_mm: float) -> np.ndarray:
    """Voxels of ``mask`` at least ``depth_mm`` from its edge, or its deepest voxels if none is that deep.

    Lesion centres are drawn from here so that a lesion sits inside its organ instead of being clipped by it.
    The distance transform runs on the mask's bounding box only.
    """
    if not mask.any():
        raise ValueError("an empty mask has no interior")
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    depth = ndimage.distance_transform_edt(np.pad(mask[box], 1), sampling=spacing)[(slice(1, -1),) * mask.ndim]
    reachable = min(depth_mm, 0.8 * float(depth.max()))
    return place(mask.shape, box, depth >= reachable)


def grid_spacing(field_of_view_mm: float, shape: tuple[int, ...]) -> tuple[float, ...]:
    """Millimetres per voxel when a square/cubic field of view is sampled on ``shape``."""
    return tuple(field_of_view_mm / n for n in shape)


@dataclass(frozen=True)
class VolumeStudy:
    """One 3D scan: the finding, its side and size, noise (in the image's own units) and a small shift."""

    finding: str
    side: str | None = None
    lesion_diameter_mm: float = 0.0
    noise: float = 0.0
    shift: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def attributes(self) -> dict[str, str]:
        return {"finding": self.finding} | ({"side": self.side} if self.side else {})

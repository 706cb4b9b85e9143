"""3D CT-like thorax/abdomen phantoms in Hounsfield units: procedural shapes, not anatomy-accurate, not patient data.

An elliptical body (fat rim over soft tissue) holds ellipsoid organs at roughly the right place and with
roughly unenhanced-CT densities: aerated lungs in the upper half, liver on the right, spleen on the left,
kidneys and a segmented spine posteriorly. Lesions are irregular blobs inside their organ. It is meant for
exercising a pipeline with exact labels, not for judging realism.

Array index ``(i, j, k)`` runs to the patient's Right, Anterior and Superior (RAS+, as NIfTI's world space), so with
an affine of ``diag(spacing)`` the volume is in canonical RAS orientation and the liver is at high ``i``, as in real
CT and MRI reoriented to RAS (CHAOS, TotalSegmentator's example). Organs are drawn in display order (the patient's
right at low ``i``, as a radiologist sees it) and mirrored into RAS once, at the end of ``draw_tissues``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .captions import ct_torso_caption as caption  # noqa: F401  (part of the kind's interface)
from .shapes import (
    Ellipsoid,
    VolumeStudy,
    blob_mask,
    choose,
    ellipsoid_in_unit_frame,
    equivalent_diameter_mm,
    gaussian_blur,
    grid_spacing,
    interior_voxels,
    log_uniform,
    normalised_grid,
    pick_voxel,
    random_rotation,
    rotation_3d,
    smooth_noise,
)

MODALITY = "ct"
BODY_REGION = "thorax_abdomen"
CASE_PREFIX = "ct"
FIELD_OF_VIEW_MM = 350.0

LABEL_NAMES = {
    0: "background",
    1: "body",
    2: "right_lung",
    3: "left_lung",
    4: "liver",
    5: "spleen",
    6: "right_kidney",
    7: "left_kidney",
    8: "vertebrae",
    9: "liver_tumour",
    10: "lung_nodule",
}
FINDING_FREQUENCIES = {"none": 0.60, "liver_tumour": 0.28, "lung_nodule": 0.12}
FINDING_LABELS = {"liver_tumour": 9, "lung_nodule": 10}

# Typical unenhanced densities (HU).
AIR, FAT, SOFT_TISSUE, LUNG, BONE, DISC = -1000.0, -100.0, 35.0, -850.0, 700.0, 80.0
LIVER, SPLEEN, KIDNEY, BLOOD, TUMOUR, NODULE = 60.0, 50.0, 30.0, 40.0, 20.0, 30.0

_SIDE_SIGN = {"right": -1.0, "left": 1.0}
_LUNG_LABELS = {"right": 2, "left": 3}
_LESION_DIAMETER_MM = {"liver_tumour": (10.0, 60.0), "lung_nodule": (5.0, 25.0)}


@dataclass(frozen=True)
class TorsoAnatomy:
    """Patient-level shape parameters in normalised units (1 = half the field of view)."""

    body_half_width: float
    body_half_depth: float
    fat_thickness: float
    lung_scale: float
    liver_scale: float
    spleen_scale: float
    diaphragm_shift: float
    vertebra_phase: float


def sample_anatomy(rng: np.random.Generator, sex: str, age: int) -> TorsoAnatomy:
    female = sex == "F"
    return TorsoAnatomy(
        body_half_width=rng.uniform(0.74, 0.86) * (0.94 if female else 1.0),
        body_half_depth=rng.uniform(0.50, 0.60) * (0.94 if female else 1.0),
        fat_thickness=rng.uniform(0.03, 0.08) + (0.03 if female else 0.0) + 0.02 * (age > 50),
        lung_scale=rng.uniform(0.92, 1.06),
        liver_scale=rng.uniform(0.9, 1.1),
        spleen_scale=rng.uniform(0.8, 1.2),
        diaphragm_shift=rng.uniform(-0.05, 0.05),
        vertebra_phase=rng.uniform(0.0, 1.0),
    )


def sample_study(rng: np.random.Generator, anatomy: TorsoAnatomy) -> VolumeStudy:
    finding = choose(rng, FINDING_FREQUENCIES)
    common = dict(noise=rng.uniform(10.0, 20.0), shift=tuple(rng.uniform(-0.02, 0.02, size=3)))
    if finding == "none":
        return VolumeStudy(finding, **common)
    diameter = log_uniform(rng, *_LESION_DIAMETER_MM[finding])
    if finding == "liver_tumour":
        side = "right" if rng.random() < 0.7 else "left"  # hepatic lobe: the right lobe is much larger
    else:
        side = "right" if rng.random() < 0.55 else "left"
    return VolumeStudy(finding, side=side, lesion_diameter_mm=diameter, **common)


@dataclass
class _Volume:
    shape: tuple[int, int, int]
    spacing: tuple[float, ...]
    hu: np.ndarray
    label: np.ndarray
    shift: tuple[float, float, float]

    def organ(self, center, radii, angles=(0.0, 0.0, 0.0)) -> np.ndarray:
        """Mask of an ellipsoid given in normalised coordinates, moved by the study's table shift."""
        moved = tuple(c + s for c, s in zip(center, self.shift))
        rotation = rotation_3d(angles) if any(angles) else None
        return ellipsoid_in_unit_frame(self.shape, moved, radii, rotation).mask(self.shape)

    def paint(self, mask: np.ndarray, hu: float | np.ndarray, label: int | None) -> None:
        self.hu[mask] = hu if np.isscalar(hu) else hu[mask]
        if label is not None:
            self.label[mask] = label


def render(
    anatomy: TorsoAnatomy, study: VolumeStudy, shape: tuple[int, ...], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, dict[str, float | int | str]]:
    """HU volume (float32), label map (uint8) and the attributes measured on what was drawn."""
    hu, label, measured = draw_tissues(anatomy, study, shape, rng)
    hu = gaussian_blur(hu, 0.4)  # partial-volume softening of edges
    hu += rng.normal(0.0, study.noise, hu.shape).astype(np.float32)
    return hu.astype(np.float32), label, measured


def draw_tissues(
    anatomy: TorsoAnatomy, study: VolumeStudy, shape: tuple[int, ...], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, dict[str, float | int | str]]:
    """The anatomy before any scanner: noise-free HU of each tissue, the label map and the measured attributes.
    CT renders it as it is; the MRI rendering of the same case (``mri_torso``) maps its tissues to MR contrast."""
    shape = tuple(int(n) for n in shape)
    hu, label = np.full(shape, AIR, np.float32), np.zeros(shape, np.uint8)
    volume = _Volume(shape, grid_spacing(FIELD_OF_VIEW_MM, shape), hu, label, study.shift)
    texture = smooth_noise(rng, shape, correlation=max(2.0, shape[0] / 12))
    inner_body = _draw_body(anatomy, volume, texture)
    _draw_abdominal_organs(anatomy, volume, texture)
    lungs = _draw_thorax(anatomy, volume, texture, inner_body)
    _draw_spine(anatomy, volume, texture)
    measured = _draw_finding(rng, volume, study, lungs)
    # Display order -> RAS: before this, every volume put the liver on the patient's left in world space, a mirror
    # image of real data that pooling with real scans (translate-chaos) exposed.
    return np.ascontiguousarray(volume.hu[::-1]), np.ascontiguousarray(volume.label[::-1]), measured


def _draw_body(anatomy: TorsoAnatomy, volume: _Volume, texture: np.ndarray) -> np.ndarray:
    """Elliptical cylinder: subcutaneous fat over a muscle wall; visceral fat mottles the abdomen."""
    x, y, z = normalised_grid(volume.shape)
    dx, dy, _ = volume.shift
    radius = np.sqrt(((x - dx) / anatomy.body_half_width) ** 2 + ((y - dy) / anatomy.body_half_depth) ** 2)
    body = np.broadcast_to(radius <= 1.0, volume.shape)
    fat_edge = 1.0 - anatomy.fat_thickness / anatomy.body_half_depth
    inner = np.broadcast_to(radius <= fat_edge - 0.08, volume.shape)
    volume.paint(body, FAT, 1)
    volume.paint(np.broadcast_to(radius <= fat_edge, volume.shape), SOFT_TISSUE, None)
    abdomen = inner & (z < _diaphragm(anatomy, volume))
    visceral = np.where(texture > 0.4, FAT + 10.0 * texture, SOFT_TISSUE - 10.0 + 8.0 * texture)
    volume.paint(abdomen, visceral.astype(np.float32), None)
    return inner


def _diaphragm(anatomy: TorsoAnatomy, volume: _Volume) -> float:
    return -0.1 + anatomy.diaphragm_shift + volume.shift[2]


def _draw_abdominal_organs(anatomy: TorsoAnatomy, volume: _Volume, texture: np.ndarray) -> None:
    top = _diaphragm(anatomy, volume)
    s = anatomy.liver_scale
    liver = volume.organ((-0.34, 0.02, top - 0.22 * s), (0.36 * s, 0.36 * s, 0.26 * s), (0.0, 0.25, 0.0))
    liver |= volume.organ((0.02, 0.18, top - 0.12 * s), (0.26 * s, 0.16 * s, 0.12 * s))  # left lobe
    volume.paint(liver, LIVER + 4.0 * texture, 4)
    s = anatomy.spleen_scale
    spleen = volume.organ((0.52, -0.22, top - 0.16), (0.11 * s, 0.18 * s, 0.16 * s), (0.0, 0.0, -0.5))
    volume.paint(spleen & ~liver, SPLEEN + 4.0 * texture, 5)
    spine = _spine_depth(anatomy)
    for sign, label, drop in ((-1.0, 6, 0.05), (1.0, 7, 0.0)):  # the liver pushes the right kidney lower
        center = (sign * 0.28, spine - 0.02, top - 0.42 - drop)
        kidney = volume.organ(center, (0.09, 0.08, 0.18), (0.0, sign * 0.25, 0.0))
        volume.paint(kidney & ~liver, KIDNEY + 4.0 * texture, label)
    aorta = volume.organ((0.06, spine + 0.14, 0.0), (0.045, 0.045, 0.75))
    volume.paint(aorta, BLOOD, 1)


def _spine_depth(anatomy: TorsoAnatomy) -> float:
    """Antero-posterior position of the vertebral bodies: a little over half-way to the back."""
    return -0.55 * anatomy.body_half_depth


def _draw_thorax(
    anatomy: TorsoAnatomy, volume: _Volume, texture: np.ndarray, inner_body: np.ndarray
) -> dict[str, np.ndarray]:
    """Lungs above the diaphragm with the heart cut out of them; ribs in the wall around them."""
    top = _diaphragm(anatomy, volume)
    s = anatomy.lung_scale
    heart = volume.organ((0.08, 0.18, top + 0.2), (0.24, 0.2, 0.2), (0.0, 0.0, 0.5))
    lungs = {}
    for side, sign in (("right", -1.0), ("left", 1.0)):
        dome = 0.04 if side == "right" else 0.0  # the right hemidiaphragm sits higher, over the liver
        center = (sign * 0.37, -0.02, top + dome + 0.55 * s)
        lung = volume.organ(center, (0.29 * s, 0.4 * s, 0.55 * s)) & inner_body & ~heart
        volume.paint(lung, LUNG + 25.0 * texture, _LUNG_LABELS[side])
        lungs[side] = lung
    volume.paint(heart, BLOOD + 5.0 * texture, 1)
    _draw_ribs(anatomy, volume, top)
    return lungs


def _draw_ribs(anatomy: TorsoAnatomy, volume: _Volume, top: float) -> None:
    """Rib cross-sections: a thin bony ring just inside the body wall, interrupted between ribs."""
    x, y, z = normalised_grid(volume.shape)
    dx, dy, dz = volume.shift
    # An ellipse inside the body wall, with the body's aspect ratio.
    half_width = anatomy.body_half_width - anatomy.fat_thickness - 0.05
    half_depth = half_width * anatomy.body_half_depth / anatomy.body_half_width
    radius = np.sqrt(((x - dx) / half_width) ** 2 + ((y - dy) / half_depth) ** 2)
    ring = (np.abs(radius - 1.0) < 0.035) & (y - dy > -0.45)
    levels = np.cos(2 * np.pi * ((z - dz) / 0.16 + anatomy.vertebra_phase)) > 0.3
    # Only in the body wall: organs lie inside the rib cage, never under a rib.
    wall = (volume.label == 1) & np.broadcast_to(ring, volume.shape)
    volume.paint(wall & levels & (z > top - 0.25), 500.0, None)


def _draw_spine(anatomy: TorsoAnatomy, volume: _Volume, texture: np.ndarray) -> None:
    """Vertebral bodies and posterior elements, separated by discs along the cranio-caudal axis."""
    _, _, z = normalised_grid(volume.shape)
    dz = volume.shift[2]
    depth = _spine_depth(anatomy)
    bodies = volume.organ((0.0, depth, 0.0), (0.085, 0.075, 1.5))
    posterior = volume.organ((0.0, depth - 0.13, 0.0), (0.045, 0.045, 1.5))
    discs = np.cos(2 * np.pi * ((z - dz) / 0.18 + anatomy.vertebra_phase)) > 0.8
    volume.paint((bodies | posterior) & ~discs, BONE + 60.0 * texture, 8)
    volume.paint(bodies & discs, DISC, 1)


def _draw_finding(
    rng: np.random.Generator, volume: _Volume, study: VolumeStudy, lungs: dict[str, np.ndarray]
) -> dict[str, float | int | str]:
    if study.finding == "none":
        return {}
    if study.finding == "liver_tumour":
        organ = _liver_lobe(volume, study.side)
        organ_label, density = 4, TUMOUR
    else:
        organ, organ_label, density = lungs[study.side], _LUNG_LABELS[study.side], NODULE
    center = pick_voxel(rng, interior_voxels(organ, volume.spacing, study.lesion_diameter_mm / 2))
    radii_mm = study.lesion_diameter_mm / 2 * rng.uniform(0.85, 1.15, size=3)
    # At coarse spacing a small lesion still covers its centre voxel, so it is never lost.
    radii_mm = np.maximum(radii_mm, 0.5 * np.asarray(volume.spacing))
    ellipsoid = Ellipsoid.from_millimetres(center, radii_mm, volume.spacing, random_rotation(rng, 3))
    lesion = blob_mask(rng, volume.shape, ellipsoid, irregularity=0.2) & (volume.label == organ_label)
    volume.hu[lesion] = density + 5.0 * rng.standard_normal(int(lesion.sum()))
    volume.label[lesion] = FINDING_LABELS[study.finding]
    measured: dict[str, float | int | str] = {"lesion_size_mm": round(equivalent_diameter_mm(lesion, volume.spacing))}
    if study.finding == "lung_nodule":
        measured["lobe"] = _lung_lobe(center, lungs[study.side], study.side)
    return measured


def _liver_lobe(volume: _Volume, side: str) -> np.ndarray:
    """The right or left hepatic lobe, split at a sagittal plane near the gallbladder fossa."""
    liver = volume.label == 4
    x, _, _ = normalised_grid(volume.shape)
    split = -0.1 + volume.shift[0]
    lobe = liver & ((x < split) if side == "right" else (x >= split))
    return lobe if lobe.any() else liver


def _lung_lobe(center: tuple[int, ...], lung: np.ndarray, side: str) -> str:
    """Upper or lower by the lung's mid-height; the anterior lower part of the right lung is the middle lobe."""
    indices = np.nonzero(lung)
    mid_k = (indices[2].min() + indices[2].max()) / 2
    mid_j = (indices[1].min() + indices[1].max()) / 2
    if center[2] >= mid_k:
        return "upper"
    return "middle" if side == "right" and center[1] > mid_j + 0.15 * np.ptp(indices[1]) else "lower"

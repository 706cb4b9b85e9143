"""3D brain-MRI-like phantoms (T1-like, arbitrary units): procedural shapes, not anatomy-accurate, not patient data.

A head ellipsoid with scalp, skull and a CSF rim holds a brain whose white/grey boundary is folded by smooth
noise, lateral ventricles that widen with age, and optionally a tumour with an enhancing rim, a necrotic
core and surrounding oedema. Magnitude (Rician) noise and a smooth bias field imitate MRI's look. Intensities
have no physical unit, as with real T1-weighted images. Meant for pipeline tests, not for judging realism.

Array index ``(i, j, k)`` runs to the patient's Right, Anterior and Superior (RAS+, as NIfTI's world space): a
tumour in the right hemisphere lies at high ``i``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .captions import brain_mri_caption as caption  # noqa: F401  (part of the kind's interface)
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

MODALITY = "mri"
BODY_REGION = "brain"
CASE_PREFIX = "mri"
FIELD_OF_VIEW_MM = 200.0

LABEL_NAMES = {0: "background", 1: "brain", 2: "ventricles", 3: "tumour"}
FINDING_FREQUENCIES = {"none": 0.70, "tumour": 0.30}
FINDING_LABELS = {"tumour": 3}

# T1-weighted contrast: fat bright, white matter brighter than grey, CSF and cortical bone dark.
SCALP, SKULL, CSF, GREY, WHITE = 0.85, 0.08, 0.12, 0.45, 0.72
ENHANCING_RIM, NECROSIS, OEDEMA_FACTOR = 0.95, 0.18, 0.75

# Normalised radius (of the head ellipsoid) at which each layer starts, from outside in.
_SKULL_START, _CSF_START, _BRAIN_START = 0.94, 0.86, 0.83
_TUMOUR_DIAMETER_MM = (15.0, 55.0)


@dataclass(frozen=True)
class HeadAnatomy:
    head_radii: tuple[float, float, float]
    ventricle_scale: float
    folding_scale: float


def sample_anatomy(rng: np.random.Generator, sex: str, age: int) -> HeadAnatomy:
    size = rng.uniform(0.95, 1.04) * (0.96 if sex == "F" else 1.0)
    return HeadAnatomy(
        head_radii=(0.7 * size, 0.88 * size, 0.78 * size),
        # Ventricles widen with age as the brain loses volume.
        ventricle_scale=rng.uniform(0.85, 1.05) * (1.0 + 0.9 * max(age - 40, 0) / 50),
        folding_scale=rng.uniform(0.05, 0.08),
    )


def sample_study(rng: np.random.Generator, anatomy: HeadAnatomy) -> VolumeStudy:
    finding = choose(rng, FINDING_FREQUENCIES)
    common = dict(noise=rng.uniform(0.015, 0.03), shift=tuple(rng.uniform(-0.03, 0.03, size=3)))
    if finding == "none":
        return VolumeStudy(finding, **common)
    diameter = log_uniform(rng, *_TUMOUR_DIAMETER_MM)
    side = "right" if rng.random() < 0.5 else "left"
    return VolumeStudy(finding, side=side, lesion_diameter_mm=diameter, **common)


def render(
    anatomy: HeadAnatomy, study: VolumeStudy, shape: tuple[int, ...], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, dict[str, float | int | str]]:
    """T1-like volume (float32, >= 0), label map (uint8) and the attributes measured on what was drawn."""
    shape = tuple(int(n) for n in shape)
    spacing = grid_spacing(FIELD_OF_VIEW_MM, shape)
    head = ellipsoid_in_unit_frame(shape, study.shift, anatomy.head_radii)
    box, depth = head.radius(shape)
    depth_full = np.full(shape, np.inf, np.float32)
    depth_full[box] = depth
    image, label = _draw_head(rng, anatomy, depth_full, study.shift)
    measured: dict[str, float | int | str] = {"ventricles": _draw_ventricles(anatomy, study, image, label, shape)}
    if study.finding == "tumour":
        measured |= _draw_tumour(rng, study, image, label, spacing)
    image = gaussian_blur(image, 0.5)
    image *= 1.0 + 0.08 * smooth_noise(rng, shape, correlation=shape[0] / 2)  # receive-coil bias field
    # Magnitude of complex Gaussian noise: Rician, never negative, like a real magnitude image.
    real = image + rng.normal(0.0, study.noise, shape).astype(np.float32)
    imaginary = rng.normal(0.0, study.noise, shape).astype(np.float32)
    return np.sqrt(real**2 + imaginary**2).astype(np.float32), label, measured


def _draw_head(
    rng: np.random.Generator, anatomy: HeadAnatomy, depth: np.ndarray, shift: tuple[float, float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Layers by depth inside the head; the grey/white boundary is pushed in and out to look folded."""
    shape = depth.shape
    image = np.zeros(shape, np.float32)
    image[depth <= 1.0] = SCALP
    image[depth <= _SKULL_START] = SKULL
    image[depth <= _CSF_START] = CSF
    brain = depth <= _BRAIN_START
    folds = smooth_noise(rng, shape, correlation=max(2.0, shape[0] / 24))
    white = depth + anatomy.folding_scale * folds <= 0.62
    image[brain] = GREY
    image[brain & white] = WHITE
    # The interhemispheric fissure: a sheet of CSF down the midline of the upper brain.
    x, _, z = normalised_grid(shape)
    voxel = 2.0 / shape[0]  # one voxel along x, in normalised units
    fissure = brain & (np.abs(x - shift[0]) < 0.6 * voxel) & (z - shift[2] > 0.0)
    image[fissure] = CSF
    label = np.zeros(shape, np.uint8)
    label[brain & ~fissure] = 1
    return image, label


def _draw_ventricles(
    anatomy: HeadAnatomy, study: VolumeStudy, image: np.ndarray, label: np.ndarray, shape: tuple[int, ...]
) -> str:
    s = anatomy.ventricle_scale
    ventricles = np.zeros(shape, bool)
    for sign in (-1.0, 1.0):
        center = tuple(c + d for c, d in zip((sign * 0.09 * s, 0.02, 0.12), study.shift))
        # Frontal horns lie close together and the ventricles diverge backwards: a slight turn about the
        # vertical axis, opposite on each side.
        diverging = rotation_3d((0.0, 0.0, sign * 0.2))
        ventricles |= ellipsoid_in_unit_frame(shape, center, (0.05 * s, 0.3, 0.09 * s), diverging).mask(shape)
    image[ventricles] = CSF
    label[ventricles] = 2
    return "enlarged" if s > 1.5 else "normal"


def _draw_tumour(
    rng: np.random.Generator,
    study: VolumeStudy,
    image: np.ndarray,
    label: np.ndarray,
    spacing: tuple[float, ...],
) -> dict[str, float | int | str]:
    """Enhancing rim, necrotic core, oedema halo, inside one hemisphere; ventricles are left intact."""
    shape = image.shape
    x, _, z = normalised_grid(shape)
    radius_mm = study.lesion_diameter_mm / 2
    brain = label == 1
    hemisphere = brain & ((x > study.shift[0]) if study.side == "right" else (x < study.shift[0]))
    hemisphere &= z - study.shift[2] > -0.3  # supratentorial, where the lobe names apply
    center = pick_voxel(rng, interior_voxels(hemisphere, spacing, radius_mm))
    radii_mm = np.maximum(radius_mm * rng.uniform(0.85, 1.15, size=3), 0.5 * np.asarray(spacing))
    tumour_shape = Ellipsoid.from_millimetres(center, radii_mm, spacing, random_rotation(rng, 3))
    tumour = blob_mask(rng, shape, tumour_shape, irregularity=0.25) & brain
    core = tumour_shape.scaled(0.55).mask(shape) & tumour
    oedema = tumour_shape.scaled(1.6).mask(shape) & brain & ~tumour
    image[oedema] *= OEDEMA_FACTOR
    image[tumour] = ENHANCING_RIM
    image[core] = NECROSIS
    label[tumour] = FINDING_LABELS["tumour"]
    return {"lesion_size_mm": round(equivalent_diameter_mm(tumour, spacing)), "lobe": _lobe(center, shape, study)}


def _lobe(center: tuple[int, ...], shape: tuple[int, ...], study: VolumeStudy) -> str:
    """A coarse lobe name from the position: front, back, low-lateral, or the top in between."""
    x, y, z = (2.0 * (c + 0.5) / n - 1.0 - s for c, n, s in zip(center, shape, study.shift))
    if y > 0.25:
        return "frontal"
    if y < -0.45:
        return "occipital"
    if z < 0.0 and abs(x) > 0.25:
        return "temporal"
    return "parietal"

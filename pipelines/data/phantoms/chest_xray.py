"""2D chest-radiograph-like phantoms: procedural shapes, not anatomy-accurate, not patient data.

The image is built like a projection: each structure adds (bone, heart, fluid) or removes (aerated lung)
attenuation in proportion to its chord length, and the sum is mapped to brightness the way film or a
detector display does (dense = bright). Ribs, clavicles and spine are bands and ellipses; lungs and heart are
ellipses. It looks like a chest film at a glance and carries exact label maps, which is what a pipeline test,
a demo or a smoke run needs; it is no substitute for real radiographs when judging image quality.

Orientation follows radiographic display: rows run superior to inferior, and the patient's right is on the
image's left. One primary finding per image, drawn with unequal frequencies so that some are rare.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .captions import chest_xray_caption as caption  # noqa: F401  (part of the kind's interface)
from .shapes import (
    Ellipsoid,
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
    rotation_2d,
    smooth_noise,
)

MODALITY = "xray"
BODY_REGION = "chest"
CASE_PREFIX = "cxr"
FIELD_OF_VIEW_MM = 400.0

LABEL_NAMES = {
    0: "background",
    1: "right_lung",
    2: "left_lung",
    3: "heart",
    4: "nodule",
    5: "consolidation",
    6: "effusion",
    7: "pneumothorax",
}
FINDING_FREQUENCIES = {
    "none": 0.50,
    "nodule": 0.15,
    "consolidation": 0.14,
    "effusion": 0.10,
    "cardiomegaly": 0.08,
    "pneumothorax": 0.03,
}
FINDING_LABELS = {"nodule": 4, "consolidation": 5, "effusion": 6, "pneumothorax": 7}
VIEW_FREQUENCIES = {"PA": 0.7, "AP": 0.3}

_SIDE_LABELS = {"right": 1, "left": 2}
# Patient's right is on the image's left.
_SIDE_SIGN = {"right": -1.0, "left": 1.0}
_ZONE_FREQUENCIES = {
    "nodule": {"upper": 0.45, "middle": 0.30, "lower": 0.25},
    "consolidation": {"upper": 0.20, "middle": 0.30, "lower": 0.50},
}
_EFFUSION_HEIGHT = {"small": (0.15, 0.22), "moderate": (0.28, 0.40), "large": (0.45, 0.60)}
_LESION_DIAMETER_MM = {"nodule": (6.0, 30.0), "consolidation": (45.0, 110.0)}
_EFFUSION_FREQUENCIES = {"small": 0.5, "moderate": 0.35, "large": 0.15}
# An AP film puts the heart further from the detector, so it projects larger.
_AP_HEART_MAGNIFICATION = 1.12
_LUNG_APEX = -0.66


@dataclass(frozen=True)
class ChestAnatomy:
    """Patient-level shape parameters, shared by all of one patient's films (normalised units)."""

    thorax_half_width: float
    lung_half_height: float
    right_dome_lift: float
    cardiothoracic_ratio: float
    heart_tilt: float
    bone_density: float
    breast_shadow: float
    rib_phase: float


@dataclass(frozen=True)
class ChestStudy:
    """One film: the finding and where it goes, plus positioning and exposure."""

    finding: str
    view: str
    side: str | None = None
    zone: str | None = None
    lesion_diameter_mm: float = 0.0
    effusion_size: str | None = None
    lung_collapse: float = 1.0
    cardiothoracic_ratio: float | None = None
    shift: tuple[float, float] = (0.0, 0.0)
    inspiration: float = 1.0
    exposure: float = 1.0

    def attributes(self) -> dict[str, str]:
        described = {"side": self.side, "zone": self.zone, "effusion_size": self.effusion_size}
        return {"finding": self.finding, "view": self.view} | {k: v for k, v in described.items() if v is not None}


def sample_anatomy(rng: np.random.Generator, sex: str, age: int) -> ChestAnatomy:
    female = sex == "F"
    return ChestAnatomy(
        thorax_half_width=rng.uniform(0.64, 0.74) * (0.95 if female else 1.0),
        lung_half_height=rng.uniform(0.50, 0.58) * (0.96 if female else 1.0),
        right_dome_lift=rng.uniform(0.02, 0.06),
        cardiothoracic_ratio=rng.uniform(0.38, 0.45) + 0.01 * (age > 65),
        heart_tilt=rng.uniform(0.25, 0.45),
        bone_density=rng.uniform(0.85, 1.05) - 0.25 * max(age - 40, 0) / 50 * (1.4 if female else 1.0),
        breast_shadow=rng.uniform(0.6, 1.0) if female else 0.0,
        rib_phase=rng.uniform(0.0, 1.0),
    )


def sample_study(rng: np.random.Generator, anatomy: ChestAnatomy) -> ChestStudy:
    finding = choose(rng, FINDING_FREQUENCIES)
    common = dict(
        view=choose(rng, VIEW_FREQUENCIES),
        shift=(rng.uniform(-0.03, 0.03), rng.uniform(-0.03, 0.03)),
        inspiration=rng.uniform(0.95, 1.04),
        exposure=rng.uniform(0.92, 1.08),
    )
    side = "right" if rng.random() < 0.5 else "left"
    if finding in ("nodule", "consolidation"):
        diameter = log_uniform(rng, *_LESION_DIAMETER_MM[finding])
        zone = choose(rng, _ZONE_FREQUENCIES[finding])
        return ChestStudy(finding, side=side, zone=zone, lesion_diameter_mm=diameter, **common)
    if finding == "effusion":
        return ChestStudy(finding, side=side, effusion_size=choose(rng, _EFFUSION_FREQUENCIES), **common)
    if finding == "pneumothorax":
        return ChestStudy(finding, side=side, lung_collapse=rng.uniform(0.68, 0.88), **common)
    if finding == "cardiomegaly":
        return ChestStudy(finding, cardiothoracic_ratio=rng.uniform(0.55, 0.66), **common)
    return ChestStudy(finding, **common)


@dataclass
class _Canvas:
    """Attenuation and labels being drawn, with the grid they live on."""

    shape: tuple[int, int]
    spacing_mm: float
    attenuation: np.ndarray
    label: np.ndarray
    lung_texture: np.ndarray

    def unit_ellipse(self, center, radii, angle: float = 0.0) -> Ellipsoid:
        return ellipsoid_in_unit_frame(self.shape, center, radii, rotation_2d(angle) if angle else None)

    def add(self, ellipse: Ellipsoid, weight: float) -> None:
        box, chord = ellipse.thickness(self.shape)
        self.attenuation[box] += np.float32(weight) * chord


def render(
    anatomy: ChestAnatomy, study: ChestStudy, shape: tuple[int, ...], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, dict[str, float | int]]:
    """Image in [0, 1] (float32), label map (uint8) and the attributes measured on what was drawn."""
    shape = (int(shape[0]), int(shape[1]))
    canvas = _Canvas(
        shape,
        grid_spacing(FIELD_OF_VIEW_MM, shape)[0],
        np.zeros(shape, np.float32),
        np.zeros(shape, np.uint8),
        smooth_noise(rng, shape, correlation=shape[0] / 28),
    )
    lungs = _lung_ellipses(anatomy, study, canvas)
    heart = _heart_ellipse(anatomy, study, canvas)
    _draw_soft_tissue(anatomy, study, canvas)
    _draw_lungs(canvas, lungs, heart, study)
    thorax = lungs["right"].mask(shape) | lungs["left"].mask(shape) | (canvas.label == 3)
    measured = {"cardiothoracic_ratio": _cardiothoracic_ratio(canvas.label == 3, thorax)}
    measured |= _draw_finding(rng, canvas, study, lungs)
    _draw_bones(anatomy, study, canvas, lungs)
    return _to_image(rng, canvas, study), canvas.label, measured


def _lung_ellipses(anatomy: ChestAnatomy, study: ChestStudy, canvas: _Canvas) -> dict[str, Ellipsoid]:
    dy, dx = study.shift
    width = anatomy.thorax_half_width
    lungs = {}
    for side, sign in _SIDE_SIGN.items():
        half_height = anatomy.lung_half_height * study.inspiration
        if side == "right":
            half_height -= anatomy.right_dome_lift / 2
        center = (_LUNG_APEX + half_height + dy, sign * width * 0.52 + dx)
        # Apices lean towards the midline; the bases flare out.
        lungs[side] = canvas.unit_ellipse(center, (half_height, width * 0.48), angle=-sign * 0.08)
    return lungs


def _heart_ellipse(anatomy: ChestAnatomy, study: ChestStudy, canvas: _Canvas) -> Ellipsoid:
    dy, dx = study.shift
    ratio = study.cardiothoracic_ratio or anatomy.cardiothoracic_ratio
    half_height = 0.16
    # Choose the long radius so that the tilted ellipse's horizontal extent gives the intended ratio.
    target = ratio * anatomy.thorax_half_width
    cos, sin = math.cos(anatomy.heart_tilt), math.sin(anatomy.heart_tilt)
    long_radius = math.sqrt(max(target**2 - (half_height * sin) ** 2, (0.5 * target) ** 2)) / cos
    bottom = _LUNG_APEX + 2 * anatomy.lung_half_height * study.inspiration
    center = (bottom - 0.24 + dy, 0.3 * target + dx)
    heart = canvas.unit_ellipse(center, (half_height, long_radius), angle=-anatomy.heart_tilt)
    return heart.scaled(_AP_HEART_MAGNIFICATION) if study.view == "AP" else heart


def _draw_soft_tissue(anatomy: ChestAnatomy, study: ChestStudy, canvas: _Canvas) -> None:
    dy, dx = study.shift
    width = anatomy.thorax_half_width
    canvas.add(canvas.unit_ellipse((0.3 + dy, dx), (1.05, width + 0.18)), 0.8)  # torso
    canvas.add(canvas.unit_ellipse((-0.58 + dy, dx), (0.36, width + 0.22)), 0.3)  # shoulder girdle
    canvas.add(canvas.unit_ellipse((-0.92 + dy, dx), (0.32, 0.2)), 0.55)  # neck
    for sign in (-1.0, 1.0) if anatomy.breast_shadow else ():
        breast = canvas.unit_ellipse((0.34 + dy, sign * width * 0.55 + dx), (0.2, 0.27))
        canvas.add(breast, 0.2 * anatomy.breast_shadow)
    canvas.add(canvas.unit_ellipse((-0.22 + dy, dx), (0.5, 0.1)), 0.3)  # mediastinum
    canvas.add(canvas.unit_ellipse((-0.32 + dy, 0.09 + dx), (0.07, 0.07)), 0.25)  # aortic knob
    for sign in (-1.0, 1.0):
        canvas.add(canvas.unit_ellipse((-0.08 + dy, sign * 0.15 + dx), (0.13, 0.07)), 0.18)  # hila


def _draw_lungs(canvas: _Canvas, lungs: dict[str, Ellipsoid], heart: Ellipsoid, study: ChestStudy) -> None:
    """Aerated lung removes attenuation; lung labels go down first so that the heart and findings cover them."""
    for side, lung in lungs.items():
        if side == study.side and study.finding == "pneumothorax":
            # Air fills the whole hemithorax; the collapsed lung is denser than normal lung (less air in it).
            canvas.add(lung, -0.64)
            lung = _collapsed_lung(lung, study)
            canvas.add(lung, 0.1)
        _draw_aerated_lung(canvas, lung, _SIDE_LABELS[side])
    box, chord = heart.thickness(canvas.shape)
    # A solid organ projects nearly uniformly, so its profile is flatter than an ellipsoid chord.
    canvas.attenuation[box] += np.float32(0.6) * np.sqrt(chord)
    canvas.label[box][chord > 0] = 3


def _draw_aerated_lung(canvas: _Canvas, lung: Ellipsoid, label: int) -> None:
    box, chord = lung.thickness(canvas.shape)
    # Lungs are dark right out to the ribs, so flatten the chord profile; vessel markings fade peripherally.
    markings = 0.06 * canvas.lung_texture[box] * chord
    canvas.attenuation[box] += -0.6 * np.sqrt(chord) + markings
    canvas.label[box][chord > 0] = label


def _collapsed_lung(lung: Ellipsoid, study: ChestStudy) -> Ellipsoid:
    """The lung shrinks towards its hilum (medial, a little below the centre)."""
    row, column = lung.center
    hilum = (row + 0.1 * lung.radii[0], column - _SIDE_SIGN[study.side] * 0.7 * lung.radii[1])
    return lung.scaled(study.lung_collapse, about=hilum)


def _cardiothoracic_ratio(heart: np.ndarray, thorax: np.ndarray) -> float:
    """Widest heart diameter over widest thorax (inner rib) diameter, as read on a film."""
    heart_columns = np.flatnonzero(heart.any(axis=0))
    thorax_columns = np.flatnonzero(thorax.any(axis=0))
    return round(float(np.ptp(heart_columns) + 1) / float(np.ptp(thorax_columns) + 1), 2)


def _draw_finding(
    rng: np.random.Generator, canvas: _Canvas, study: ChestStudy, lungs: dict[str, Ellipsoid]
) -> dict[str, float | int]:
    if study.finding in ("nodule", "consolidation"):
        return _draw_opacity(rng, canvas, study)
    if study.finding == "effusion":
        return _draw_effusion(canvas, study, lungs[study.side])
    if study.finding == "pneumothorax":
        return _draw_pneumothorax(canvas, study, lungs[study.side])
    return {}


def _zone_rows(lung_mask: np.ndarray, zone: str) -> np.ndarray:
    """Rows of the upper, middle or lower third of a lung's height."""
    rows = np.flatnonzero(lung_mask.any(axis=1))
    top, bottom = rows.min(), rows.max() + 1
    third = (bottom - top) / 3
    start = top + round(third * ("upper", "middle", "lower").index(zone))
    in_zone = np.zeros(lung_mask.shape[0], bool)
    in_zone[start : max(start + 1, round(start + third))] = True
    return in_zone


def _draw_opacity(rng: np.random.Generator, canvas: _Canvas, study: ChestStudy) -> dict[str, float | int]:
    """A nodule (small, round, dense) or consolidation (large, irregular, hazy) inside one lung zone."""
    lung = canvas.label == _SIDE_LABELS[study.side]
    radius_px = max(study.lesion_diameter_mm / 2 / canvas.spacing_mm, 0.5)
    in_zone = lung & _zone_rows(lung, study.zone)[:, None]
    spacing = (canvas.spacing_mm,) * 2
    center = pick_voxel(rng, interior_voxels(in_zone, spacing, study.lesion_diameter_mm / 2))
    radii = (radius_px, radius_px * rng.uniform(0.85, 1.15))
    ellipse = Ellipsoid.from_radii(center, radii, random_rotation(rng, 2))
    if study.finding == "nodule":
        region = ellipse.mask(canvas.shape) & lung
        box, chord = ellipse.thickness(canvas.shape)
        canvas.attenuation[box] += np.float32(0.12 + 0.2 * min(study.lesion_diameter_mm / 30, 1.0)) * chord
    else:
        region = blob_mask(rng, canvas.shape, ellipse, irregularity=0.35) & lung
        haze = gaussian_blur(region.astype(np.float32), radius_px * 0.15)
        canvas.attenuation += (0.38 + 0.06 * canvas.lung_texture) * haze
    canvas.label[region] = FINDING_LABELS[study.finding]
    return {"lesion_size_mm": round(equivalent_diameter_mm(region, spacing))}


def _draw_effusion(canvas: _Canvas, study: ChestStudy, lung: Ellipsoid) -> dict[str, float | int]:
    """Fluid fills the lung base up to a meniscus that climbs laterally, whiting out the aerated lung."""
    lung_mask = canvas.label == _SIDE_LABELS[study.side]
    rows = np.flatnonzero(lung_mask.any(axis=1))
    columns = np.flatnonzero(lung_mask.any(axis=0))
    low, high = _EFFUSION_HEIGHT[study.effusion_size]
    height = (rows.max() - rows.min()) * (low + high) / 2
    row, column = np.ogrid[: canvas.shape[0], : canvas.shape[1]]
    medial_column = columns.max() if study.side == "right" else columns.min()
    lateral = np.abs(column - medial_column) / max(columns.size, 1)
    # The meniscus: concave upwards, climbing towards the lateral chest wall.
    meniscus = rows.max() - height * (0.6 + 0.8 * lateral**2)
    region = lung_mask & (row >= meniscus)
    box, chord = lung.thickness(canvas.shape)
    fluid = gaussian_blur(region[box].astype(np.float32), canvas.shape[0] / 200)
    canvas.attenuation[box] += (0.6 * np.sqrt(chord) + 0.1) * fluid
    canvas.label[region] = FINDING_LABELS["effusion"]
    return {}


def _draw_pneumothorax(canvas: _Canvas, study: ChestStudy, lung: Ellipsoid) -> dict[str, float | int]:
    """Label the air around the collapsed lung and draw the visceral pleural line at its edge."""
    collapsed = _collapsed_lung(lung, study)
    region = lung.mask(canvas.shape) & (canvas.label == 0)
    canvas.label[region] = FINDING_LABELS["pneumothorax"]
    box, radius = collapsed.radius(canvas.shape, margin=1.1)
    edge = np.clip(1.0 - np.abs(radius - 1.0) * float(collapsed.radii.min()) / 0.8, 0.0, None)
    canvas.attenuation[box] += np.float32(0.1) * edge
    # Rim depth at the apex, measured on the label map along the collapsed lung's central column.
    column = int(round(collapsed.center[1]))
    rim_px = int((canvas.label[: int(collapsed.center[0]), column] == FINDING_LABELS["pneumothorax"]).sum())
    return {"rim_mm": round(rim_px * canvas.spacing_mm)}


def _draw_bones(anatomy: ChestAnatomy, study: ChestStudy, canvas: _Canvas, lungs: dict[str, Ellipsoid]) -> None:
    dy, dx = study.shift
    density = anatomy.bone_density
    row, column = normalised_grid(canvas.shape)
    # Spine: a vertical band with a vertebra-by-vertebra ripple.
    spine = canvas.unit_ellipse((0.1 + dy, dx), (1.4, 0.05))
    box, chord = spine.thickness(canvas.shape)
    ripple = 1.0 + 0.2 * np.cos(2 * np.pi * (row[box[0]] - dy) / 0.085)
    canvas.attenuation[box] += np.float32(0.32 * density) * chord * ripple
    for side, sign in _SIDE_SIGN.items():
        _draw_ribs(anatomy, study, canvas, lungs[side].scaled(1.12), row, column)
        clavicle = canvas.unit_ellipse((-0.68 + dy, sign * 0.3 + dx), (0.028, 0.3), angle=sign * 0.18)
        canvas.add(clavicle, 0.3 * density)
        if study.view == "AP":  # scapulae project over the lungs when the arms are not rotated forward
            scapula_center = (-0.35 + dy, sign * anatomy.thorax_half_width * 0.85 + dx)
            canvas.add(canvas.unit_ellipse(scapula_center, (0.3, 0.12)), 0.15)


def _draw_ribs(
    anatomy: ChestAnatomy, study: ChestStudy, canvas: _Canvas, cage: Ellipsoid, row: np.ndarray, column: np.ndarray
) -> None:
    """Posterior ribs: bands that run level from the spine and curve down laterally, evenly spaced."""
    box, chord = cage.thickness(canvas.shape)
    dy, dx = study.shift
    lateral = np.abs(column[:, box[1]] - dx) / anatomy.thorax_half_width
    phase = (row[box[0]] - dy - 0.28 * lateral**2) / 0.13 + anatomy.rib_phase
    band = np.clip((np.cos(2 * np.pi * phase) - 0.55) / 0.45, 0.0, None)
    canvas.attenuation[box] += np.float32(0.12 * anatomy.bone_density) * band * (chord > 0)


def _to_image(rng: np.random.Generator, canvas: _Canvas, study: ChestStudy) -> np.ndarray:
    """Exponential display mapping of the summed attenuation, plus detector blur and quantum noise."""
    attenuation = gaussian_blur(canvas.attenuation, max(0.5, canvas.shape[0] / 256))
    image = 1.0 - np.exp(-1.6 * study.exposure * np.clip(attenuation, 0.0, None))
    image += rng.normal(0.0, 0.012, canvas.shape).astype(np.float32)
    return np.clip(image, 0.0, 1.0).astype(np.float32)

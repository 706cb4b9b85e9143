"""The CT torso phantom's anatomy as abdominal T2-weighted, fat-suppressed MRI (T2-SPIR, as in CHAOS).

Case for case the same patients, organs and lesions as ``ct_torso`` with the same seed: the anatomy is drawn by
``ct_torso.draw_tissues`` from the same random stream, then each tissue gets its T2-SPIR brightness instead of its
HU, and the scanner adds what MRI has and CT has not: a smooth multiplicative bias field (coil sensitivity) and
Rician noise. A cohort of both kinds is therefore a paired set (same ``patient_id``, same label map voxel for
voxel), the pixel truth a CT <-> MRI translation is scored against. Procedural shapes, not patient data.

Relative brightness on T2-SPIR (fat suppressed): fluid-rich spleen and kidneys bright, liver darker than spleen,
tumours brighter than liver, suppressed fat, muscle and bone marrow dark, air, lung and cortical bone black.
"""

from __future__ import annotations

import numpy as np

from . import ct_torso
from .ct_torso import (
    BODY_REGION,
    FIELD_OF_VIEW_MM,
    FINDING_FREQUENCIES,
    FINDING_LABELS,
    LABEL_NAMES,
    sample_anatomy,
    sample_study,
)
from .shapes import VolumeStudy, gaussian_blur, smooth_noise

__all__ = ["BODY_REGION", "CASE_PREFIX", "FIELD_OF_VIEW_MM", "FINDING_FREQUENCIES", "FINDING_LABELS", "LABEL_NAMES",
           "MODALITY", "caption", "render", "sample_anatomy", "sample_study"]

MODALITY = "mri"
CASE_PREFIX = "mr"
SCANNER_UNITS = 1000.0  # arbitrary MR units: brightness 1 reads as this

# T2-SPIR brightness of each labelled tissue (label value -> relative signal); body wall tissues by their HU below.
_LABEL_SIGNAL = {0: 0.0, 2: 0.03, 3: 0.03, 4: 0.30, 5: 0.62, 6: 0.70, 7: 0.70, 8: 0.20, 9: 0.85, 10: 0.45}
_SOFT_TISSUE_SIGNAL, _FAT_SIGNAL, _CORTICAL_BONE_SIGNAL = 0.22, 0.10, 0.04
_FAT_BELOW_HU, _BONE_ABOVE_HU = -40.0, 300.0


def caption(attributes) -> str:
    return ct_torso.caption(attributes).replace("Non-contrast CT", "T2-weighted fat-suppressed MRI", 1)


def render(
    anatomy: ct_torso.TorsoAnatomy, study: VolumeStudy, shape: tuple[int, ...], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, dict[str, float | int | str]]:
    """MR volume (float32, arbitrary units), label map (uint8) and the measured attributes: ``ct_torso``'s case."""
    hu, label, measured = ct_torso.draw_tissues(anatomy, study, shape, rng)
    signal = t2_spir_signal(hu, label)
    signal *= 1.0 + 0.06 * smooth_noise(rng, label.shape, correlation=max(2.0, label.shape[0] / 12))  # tissue texture
    signal = gaussian_blur(signal, 0.4)  # partial volume
    signal *= np.exp(0.2 * smooth_noise(rng, label.shape, correlation=label.shape[0] / 2))  # coil bias field
    sigma = rng.uniform(0.015, 0.03)
    # Rician noise: the magnitude of a complex signal with Gaussian noise in both channels.
    real = signal + rng.normal(0.0, sigma, label.shape)
    imaginary = rng.normal(0.0, sigma, label.shape)
    return (np.hypot(real, imaginary) * SCANNER_UNITS).astype(np.float32), label, measured


def t2_spir_signal(hu: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Noise-free relative T2-SPIR signal of a drawn volume: organs by label, the body wall by its HU (fat, bone)."""
    signal = np.full(hu.shape, _SOFT_TISSUE_SIGNAL, np.float32)
    for value, brightness in _LABEL_SIGNAL.items():
        signal[label == value] = brightness
    wall = label == 1
    signal[wall & (hu < _FAT_BELOW_HU)] = _FAT_SIGNAL
    signal[wall & (hu > _BONE_ABOVE_HU)] = _CORTICAL_BONE_SIGNAL
    return signal

"""Built-in procedural phantoms: seeded, synthetic medical-image-like cases with exact label maps.

radsynth cannot ship patient data, yet every stage needs images to run on: demos, tests, smoke runs. These
generators draw chest-radiograph-like 2D images, CT-like thorax/abdomen volumes and T1-MRI-like brain volumes
from ellipsoids, bands and smooth noise. They are **procedural shapes, not anatomy-accurate, and not patient
data**: good for exercising a pipeline end to end (labels are exact, findings have realistic, unequal
frequencies so that some are rare), not for judging how realistic a generative model's samples are.

A cohort is planned first (which case belongs to which patient), then every case is drawn from its own
random stream derived from ``(seed, case index)``, so any case can be regenerated alone, in any order or
process, bit for bit. Follow-up images of one patient share that patient's anatomy, sex and (roughly) age;
their findings are drawn independently.

Each kind is a module with the same small interface: ``LABEL_NAMES``, ``FINDING_FREQUENCIES``, ``MODALITY``,
``BODY_REGION``, ``CASE_PREFIX``, ``FIELD_OF_VIEW_MM``, ``sample_anatomy(rng, sex, age)``,
``sample_study(rng, anatomy)``, ``render(anatomy, study, shape, rng)`` and ``caption(attributes)``.
"""

from __future__ import annotations

from . import brain_mri, chest_xray, ct_torso
from .cohort import (
    AGE_RANGE,
    IMAGES_PER_PATIENT_FREQUENCIES,
    KINDS,
    CohortSlot,
    Patient,
    PhantomCase,
    generate_case,
    generate_cohort,
    grid_shape,
    kind_module,
    plan_cohort,
    sample_attributes,
    sample_patient,
)

CHEST_XRAY_LABEL_NAMES = chest_xray.LABEL_NAMES
CT_TORSO_LABEL_NAMES = ct_torso.LABEL_NAMES
BRAIN_MRI_LABEL_NAMES = brain_mri.LABEL_NAMES
CHEST_XRAY_FINDING_FREQUENCIES = chest_xray.FINDING_FREQUENCIES
CT_TORSO_FINDING_FREQUENCIES = ct_torso.FINDING_FREQUENCIES
BRAIN_MRI_FINDING_FREQUENCIES = brain_mri.FINDING_FREQUENCIES

__all__ = [
    "AGE_RANGE",
    "BRAIN_MRI_FINDING_FREQUENCIES",
    "BRAIN_MRI_LABEL_NAMES",
    "CHEST_XRAY_FINDING_FREQUENCIES",
    "CHEST_XRAY_LABEL_NAMES",
    "CT_TORSO_FINDING_FREQUENCIES",
    "CT_TORSO_LABEL_NAMES",
    "IMAGES_PER_PATIENT_FREQUENCIES",
    "KINDS",
    "CohortSlot",
    "Patient",
    "PhantomCase",
    "generate_case",
    "generate_cohort",
    "grid_shape",
    "kind_module",
    "plan_cohort",
    "sample_attributes",
    "sample_patient",
]

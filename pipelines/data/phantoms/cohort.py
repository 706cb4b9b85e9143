"""Cohorts of phantom cases: which case belongs to which patient, and drawing each case from its own stream."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from ..manifest import AttributeValue
from . import brain_mri, chest_xray, ct_torso, mri_torso
from .shapes import choose, grid_spacing

# Bump whenever drawing changes, so folders of phantoms written by an older generator are never reused.
GENERATOR_VERSION = 1

# mri_torso is ct_torso's anatomy as T2-SPIR MRI: the same seed gives the same patients, a CT <-> MRI paired set.
KINDS: dict[str, ModuleType] = {"chest_xray": chest_xray, "ct_torso": ct_torso, "mri_torso": mri_torso,
                                "brain_mri": brain_mri}

# Images per patient: most have one, some have follow-ups (about 1.4 on average).
IMAGES_PER_PATIENT_FREQUENCIES = {1: 0.7, 2: 0.2, 3: 0.1}
AGE_RANGE = (18, 90)

# Independent random streams, so that e.g. adding a patient never changes another patient's anatomy.
_PLAN_STREAM, _PATIENT_STREAM, _CASE_STREAM = 0, 1, 2


@dataclass
class PhantomCase:
    """One drawn case. ``image`` is float32: [0, 1] for the radiograph, HU for CT, arbitrary units for MRI;
    ``label`` is uint8 on the same grid; ``spacing`` is in millimetres per array axis."""

    image: np.ndarray
    label: np.ndarray
    label_names: dict[int, str]
    spacing: tuple[float, ...]
    attributes: dict[str, AttributeValue]
    text: str
    patient_id: str
    case_id: str


@dataclass(frozen=True)
class CohortSlot:
    """Where one case sits in a cohort: its index (which seeds it), its patient and its visit number."""

    index: int
    case_id: str
    patient_index: int
    patient_id: str
    visit: int


@dataclass(frozen=True)
class Patient:
    """One synthetic patient: demographics and the kind's anatomy parameters, shared by all their visits."""

    sex: str
    age: int
    anatomy: object


def kind_module(kind: str) -> ModuleType:
    if kind not in KINDS:
        raise ValueError(f"unknown phantom kind '{kind}'; allowed: {', '.join(KINDS)}")
    return KINDS[kind]


def grid_shape(kind: str, size: int = 128, shape: Sequence[int] = (64, 64, 64)) -> tuple[int, ...]:
    """The array shape a kind draws on: ``size`` x ``size`` for the radiograph, ``shape`` for volumes."""
    return (int(size), int(size)) if kind == "chest_xray" else tuple(int(n) for n in shape)


def plan_cohort(kind: str, n_cases: int, seed: int = 0) -> list[CohortSlot]:
    """Assign case indices to patients: consecutive cases of one patient are that patient's visits."""
    prefix = kind_module(kind).CASE_PREFIX
    rng = np.random.default_rng([seed, _PLAN_STREAM])
    visits: list[tuple[int, int]] = []  # (patient index, visit number) per case
    while len(visits) < n_cases:
        patient = visits[-1][0] + 1 if visits else 0
        visits += [(patient, visit) for visit in range(choose(rng, IMAGES_PER_PATIENT_FREQUENCIES))]
    visits = visits[:n_cases]
    case_digits = max(5, len(str(n_cases)))
    patient_digits = max(4, len(str(visits[-1][0] + 1 if visits else 0)))
    return [
        CohortSlot(index, f"phantom_{prefix}_{index + 1:0{case_digits}d}", patient,
                   f"phantom_p{patient + 1:0{patient_digits}d}", visit)
        for index, (patient, visit) in enumerate(visits)
    ]


def sample_patient(kind: str, patient_index: int, seed: int = 0) -> Patient:
    rng = np.random.default_rng([seed, _PATIENT_STREAM, patient_index])
    sex = "F" if rng.random() < 0.5 else "M"
    # Imaging cohorts skew older; clip a broad bell to the adult range.
    age = int(np.clip(round(rng.normal(58, 16)), *AGE_RANGE))
    return Patient(sex, age, kind_module(kind).sample_anatomy(rng, sex, age))


def _study_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _CASE_STREAM, index])


def _demographics(patient: Patient, slot: CohortSlot) -> dict[str, AttributeValue]:
    # A follow-up is taken about a year after the previous image.
    return {"sex": patient.sex, "age": min(patient.age + slot.visit, AGE_RANGE[1])}


def sample_attributes(kind: str, n_cases: int, seed: int = 0) -> list[dict[str, AttributeValue]]:
    """The sampled (not measured) attributes of a cohort, without drawing a single image.

    Uses the same random streams as ``generate_cohort``, so these are the attributes the images will have.
    """
    module, attributes, patients = kind_module(kind), [], {}
    for slot in plan_cohort(kind, n_cases, seed):
        if slot.patient_index not in patients:
            patients[slot.patient_index] = sample_patient(kind, slot.patient_index, seed)
        patient = patients[slot.patient_index]
        study = module.sample_study(_study_rng(seed, slot.index), patient.anatomy)
        attributes.append(study.attributes() | _demographics(patient, slot))
    return attributes


def generate_case(
    kind: str, slot: CohortSlot, seed: int, shape: Sequence[int], patient: Patient | None = None
) -> PhantomCase:
    """Draw one case; it depends only on ``(kind, seed, slot, shape)``, never on which cases came before."""
    module = kind_module(kind)
    shape = tuple(int(n) for n in shape)
    patient = patient or sample_patient(kind, slot.patient_index, seed)
    rng = _study_rng(seed, slot.index)
    study = module.sample_study(rng, patient.anatomy)
    image, label, measured = module.render(patient.anatomy, study, shape, rng)
    attributes = study.attributes() | _demographics(patient, slot) | measured
    return PhantomCase(
        image=image,
        label=label,
        label_names=dict(module.LABEL_NAMES),
        spacing=grid_spacing(module.FIELD_OF_VIEW_MM, shape),
        attributes=attributes,
        text=module.caption(attributes),
        patient_id=slot.patient_id,
        case_id=slot.case_id,
    )


def generate_cohort(
    kind: str, n_cases: int, seed: int = 0, *, size: int = 128, shape: Sequence[int] = (64, 64, 64)
) -> Iterator[PhantomCase]:
    """Yield ``n_cases`` phantom cases one at a time (a cohort of volumes need not fit in memory)."""
    grid = grid_shape(kind, size, shape)
    patients: dict[int, Patient] = {}
    for slot in plan_cohort(kind, n_cases, seed):
        if slot.patient_index not in patients:  # a patient's visits are consecutive: keep only the current one
            patients = {slot.patient_index: sample_patient(kind, slot.patient_index, seed)}
        yield generate_case(kind, slot, seed, grid, patients[slot.patient_index])


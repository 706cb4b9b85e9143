"""Deterministic patient-disjoint splits: train (the generator learns from it), holdout (the privacy
reference, never trained on) and test (evaluation and utility).

Patients, not images, are split: two radiographs of one patient in train and holdout would make a copy of
a training image look like a fresh holdout image and blind every privacy check. Patients are ordered by a
seeded hash of their id (stable, independent of file order) and cut so that each split receives its share
of *cases*; with ``stratify_by`` the cut is made within each stratum so rare findings reach every split.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from radsynth.configs.errors import UserInputError
from radsynth.configs.schema import SPLIT_NAMES, SplitConfig

from .manifest import CaseRecord, check_patient_disjoint


def check_named_attributes(records: Sequence[CaseRecord], named: dict[str, list[str]]) -> None:
    """Every attribute a setting names (``{"data.split.stratify_by": ["finding"], ...}``) is one some case has:
    a typo would otherwise stratify nothing, or condition on nothing, without a word."""
    present = {key for record in records for key, value in record.attributes.items() if value not in (None, "")}
    for setting, attributes in named.items():
        for attribute in attributes:
            if attribute not in present:
                raise UserInputError(setting, f"no case has the attribute '{attribute}'",
                                     f"one of: {', '.join(sorted(present)) or '(the data has no attributes)'}")


def assign_splits(records: Sequence[CaseRecord], config: SplitConfig, where: str | Path) -> list[CaseRecord]:
    """Return records with ``split`` set; splits the source already gave are kept and checked instead."""
    if any(record.split is not None for record in records):
        missing = [record.case_id for record in records if record.split is None]
        if missing:
            raise UserInputError(where, f"split given for some cases but not {', '.join(missing[:5])}",
                                 "give a split for every case or for none")
        check_patient_disjoint(records, where)
        return list(records)

    cases_of: dict[str, list[CaseRecord]] = defaultdict(list)
    for record in records:
        cases_of[record.patient_id].append(record)

    strata: dict[str, list[str]] = defaultdict(list)
    for patient, cases in cases_of.items():
        strata[_stratum(cases, config.stratify_by)].append(patient)

    split_of: dict[str, str] = {}
    for stratum in sorted(strata):
        patients = patient_order(strata[stratum], config.seed)
        split_of.update(_cut(patients, {p: len(cases_of[p]) for p in patients}, config.fractions()))
    return [record.model_copy(update={"split": split_of[record.patient_id]}) for record in records]


def patient_order(patients: Iterable[str], seed: int) -> list[str]:
    """Patients in a seeded order that depends on nothing but their ids (not on the order they were read in)."""
    return sorted(patients, key=lambda patient: hashlib.sha256(f"{seed}:{patient}".encode()).hexdigest())


def _stratum(cases: list[CaseRecord], attribute: str | None) -> str:
    """A patient's stratum is its most frequent value of the attribute (ties: the rarest name sorts first)."""
    if attribute is None:
        return ""
    counts = Counter(str(case.attributes.get(attribute)) for case in cases)
    return min(counts, key=lambda value: (-counts[value], value))


def _cut(patients: list[str], n_cases: dict[str, int], fractions: dict[str, float]) -> dict[str, str]:
    """Walk patients in hash order, giving each to the split furthest below its target share of cases."""
    total = sum(n_cases.values())
    filled = dict.fromkeys(SPLIT_NAMES, 0)
    assigned: dict[str, str] = {}
    for patient in patients:
        # Deficit relative to target after this patient is placed; ties go to the earlier split name order.
        split = max(
            (name for name in SPLIT_NAMES if fractions[name] > 0),
            key=lambda name: fractions[name] * total - filled[name] - 1e-9 * SPLIT_NAMES.index(name),
        )
        assigned[patient] = split
        filled[split] += n_cases[patient]
    return assigned


def split_counts(records: Sequence[CaseRecord]) -> dict[str, dict[str, int]]:
    counts = {}
    for name in SPLIT_NAMES:
        members = [record for record in records if record.split == name]
        counts[name] = {"cases": len(members), "patients": len({record.patient_id for record in members})}
    return counts

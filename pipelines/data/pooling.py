"""Several datasets in one manifest (``data.sources``): the training data of a multi-dataset, multi-modality base.

Each source is read by its own adapter and split by its own patients with the config's split settings, exactly
as if it were ingested alone: a base pretrained on the pool has seen a dataset's train patients and none of its
holdout or test patients, so fine-tuning on that dataset later still has unseen patients to score privacy
against. A ``train_only`` source (MedNIST: no patient ids) goes wholly to train, so it is never a privacy
reference. Case and patient ids are prefixed with the source's name: two datasets may both have a patient "1".
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from radsynth.configs.errors import UserInputError
from radsynth.configs.schema import DataConfig, PooledSource, SplitConfig

from .adapters import read_source
from .manifest import CaseRecord, file_sha256, matches
from .splits import assign_splits, patient_order

POOLED_WHERE = "data.sources"


def pooled_records(data: DataConfig, work_dir: Path) -> list[CaseRecord]:
    """Every source's records, drawn, split and renamed; one label vocabulary across the labelled ones."""
    records = []
    for source in data.sources:
        where = f"{POOLED_WHERE}[{source.name}]"
        own = read_source(source, Path(work_dir) / source.name)
        if not own:
            raise UserInputError(where, "no cases found", f"see the layout expected by format '{source.format}'")
        own = _drawn(_filtered(own, source.filter, where), source.max_cases, data.split.seed)
        if not source.with_labels:
            own = [record.model_copy(update={"label": None, "sha256": file_sha256(record.image)}) for record in own]
        own = _split(own, source, data.split, where)
        records += [record.model_copy(update={"case_id": f"{source.name}.{record.case_id}",
                                              "patient_id": f"{source.name}/{record.patient_id}",
                                              "source": source.name}) for record in own]
    return _one_vocabulary(records) if data.label_names is None else _shared_vocabulary(records, data.label_names)


def _filtered(records: list[CaseRecord], wanted: dict, where: str) -> list[CaseRecord]:
    """The cases with every value of ``wanted`` (``manifest.matches``)."""
    kept = [record for record in records if matches(record, wanted)]
    if not kept:
        raise UserInputError(f"{where}.filter", f"no case has {wanted}",
                             "values of modality, body_region or an attribute as the source records them")
    return kept


def _drawn(records: list[CaseRecord], max_cases: int | None, seed: int) -> list[CaseRecord]:
    """Whole patients in a seeded order until ``max_cases`` cases are reached (a patient is never cut in two)."""
    if max_cases is None or len(records) <= max_cases:
        return records
    cases_of: dict[str, list[CaseRecord]] = defaultdict(list)
    for record in records:
        cases_of[record.patient_id].append(record)
    kept: list[CaseRecord] = []
    for patient in patient_order(cases_of, seed):
        if len(kept) + len(cases_of[patient]) > max_cases:
            continue
        kept += cases_of[patient]
    return kept


def _split(records: list[CaseRecord], source: PooledSource, split: SplitConfig, where: str) -> list[CaseRecord]:
    if source.train_only:
        return [record.model_copy(update={"split": "train"}) for record in records]
    return assign_splits(records, split, where)


def _one_vocabulary(records: list[CaseRecord]) -> list[CaseRecord]:
    """Label value 1 must mean one thing across the pool; images without labels take the pool's vocabulary."""
    vocabularies = {record.source: record.label_names for record in records if record.label is not None}
    distinct = {tuple(sorted(names.items())) for names in vocabularies.values()}
    if len(distinct) > 1:
        shown = "; ".join(f"{source}: {names}" for source, names in sorted(vocabularies.items()))
        raise UserInputError(POOLED_WHERE, f"the sources name their labels differently ({shown})",
                             "the same label_names in each, or with_labels: false on the sources whose labels differ")
    names = next(iter(vocabularies.values()), {0: "background"})
    return [record if record.label is not None else record.model_copy(update={"label_names": names})
            for record in records]


def label_key(name: str) -> str:
    """Label names compared across datasets: 'Right Kidney', 'right-kidney' and 'right_kidney' are one."""
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


def _shared_vocabulary(records: list[CaseRecord], shared: dict[int, str]) -> list[CaseRecord]:
    """Every labelled source's labels mapped by name onto the pool's vocabulary (``data.label_names``); a label it
    does not name becomes background (a 117-class segmentation pooled for its liver, kidneys and spleen)."""
    by_key = {label_key(name): value for value, name in shared.items()}
    named = set()
    pooled = []
    for record in records:
        update: dict = {"label_names": dict(shared)}
        if record.label is not None:
            values = {value: by_key.get(label_key(name), 0) for value, name in record.label_names.items()}
            named |= {label_key(record.label_names[value]) for value, target in values.items() if target}
            update["label_values"] = values
        pooled.append(record.model_copy(update=update))
    unnamed = sorted(name for name, value in by_key.items() if value and name not in named)
    if unnamed:
        raise UserInputError("data.label_names", f"no labelled source names {unnamed}",
                             "names the sources' own label maps use (matched ignoring case, spaces and hyphens)")
    return pooled

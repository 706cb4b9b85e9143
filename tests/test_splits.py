from collections import Counter

import pytest

from radsynth.configs import UserInputError
from radsynth.configs.schema import SplitConfig
from radsynth.pipelines.data.manifest import CaseRecord
from radsynth.pipelines.data.splits import assign_splits, split_counts


def cohort(n_patients=60, images_per_patient=(1, 2, 3), rare_every=10):
    records = []
    for p in range(n_patients):
        finding = "rare" if p % rare_every == 0 else "common"
        for i in range(images_per_patient[p % len(images_per_patient)]):
            records.append(CaseRecord(case_id=f"c{p}_{i}", patient_id=f"P{p}", modality="xray", body_region="chest",
                                      image=f"/x/c{p}_{i}.png", spacing=(1, 1), shape=(8, 8),
                                      attributes={"finding": finding}, source="t", sha256="0"))
    return records


def test_every_patient_lands_in_exactly_one_split():
    split = assign_splits(cohort(), SplitConfig(), "t")
    splits_of = {}
    for record in split:
        splits_of.setdefault(record.patient_id, set()).add(record.split)
    assert all(len(s) == 1 for s in splits_of.values())
    assert {r.split for r in split} == {"train", "holdout", "test"}


def test_split_sizes_follow_the_fractions_in_cases():
    records = cohort(n_patients=200)
    counts = split_counts(assign_splits(records, SplitConfig(train=0.6, holdout=0.2, test=0.2), "t"))
    total = len(records)
    for name, fraction in [("train", 0.6), ("holdout", 0.2), ("test", 0.2)]:
        assert abs(counts[name]["cases"] / total - fraction) < 0.01


def test_splits_are_deterministic_independent_of_order_and_change_with_the_seed():
    records = cohort()
    first = {r.case_id: r.split for r in assign_splits(records, SplitConfig(seed=3), "t")}
    again = {r.case_id: r.split for r in assign_splits(list(reversed(records)), SplitConfig(seed=3), "t")}
    other = {r.case_id: r.split for r in assign_splits(records, SplitConfig(seed=4), "t")}
    assert first == again
    assert first != other


def test_stratification_puts_a_rare_finding_in_every_split():
    records = cohort(n_patients=100, images_per_patient=(1,), rare_every=10)  # 10 rare patients
    stratified = assign_splits(records, SplitConfig(stratify_by="finding"), "t")
    rare = Counter(r.split for r in stratified if r.attributes["finding"] == "rare")
    assert rare == {"train": 7, "holdout": 2, "test": 1} or rare == {"train": 7, "holdout": 1, "test": 2}


def test_given_splits_are_kept_but_a_patient_in_two_splits_is_refused():
    records = [r.model_copy(update={"split": "train" if i % 2 else "test"}) for i, r in enumerate(cohort(6, (1,)))]
    assert [r.split for r in assign_splits(records, SplitConfig(), "t")] == [r.split for r in records]
    leaking = cohort(4, (2,))
    leaking = [r.model_copy(update={"split": "train" if r.case_id.endswith("_0") else "holdout"}) for r in leaking]
    with pytest.raises(UserInputError, match="one patient is in splits"):
        assign_splits(leaking, SplitConfig(), "labels.csv")

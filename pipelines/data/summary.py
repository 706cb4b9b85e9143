"""The dataset summary printed after ingest: counts, splits, geometry, labels and attribute frequencies.

Only aggregates: no patient id, no case text. Attribute values are counted only when they look categorical
(few distinct values); numeric attributes such as age are summarised by range and median.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence

import numpy as np

from .cache import PreprocessedCache
from .manifest import CaseRecord
from .splits import split_counts

MAX_CATEGORIES = 20


def summarize(records: Sequence[CaseRecord], cache: PreprocessedCache) -> dict:
    train = [record for record in records if record.split == "train"] or list(records)
    label_names = records[0].label_names if records else {}
    return {
        "dataset_cases": len(records),
        "patients": len({record.patient_id for record in records}),
        "modality": dict(Counter(record.modality for record in records)),
        "body_region": dict(Counter(record.body_region for record in records)),
        "origin": dict(Counter(record.origin for record in records)),
        "licenses": dict(Counter(record.license for record in records)),
        "splits": split_counts(records),
        "with_label": sum(record.label is not None for record in records),
        "source_shape": _range([record.shape for record in records]),
        "source_spacing": _range([record.spacing for record in records]),
        **_train_statistics(train, cache, label_names),
        "labels_lost_in_preprocessing": _lost_labels(records, cache),
        "attributes": _attributes(records),
    }


def _range(values: list[tuple]) -> dict:
    array = np.array([list(v) for v in values], dtype=np.float64)
    return {"min": array.min(0).round(4).tolist(), "median": np.median(array, 0).round(4).tolist(),
            "max": array.max(0).round(4).tolist()}


def _train_statistics(train: Sequence[CaseRecord], cache: PreprocessedCache, label_names: dict[int, str]) -> dict:
    """One streaming pass over the cached train cases (3D datasets do not fit in memory at once).

    The intensity reference is the median physical range over train cases: how generated images are mapped
    back to physical units.
    """
    shape, lows, highs, mode = None, [], [], None
    counts = np.zeros(max(label_names, default=0) + 1, dtype=np.int64)
    for record in train:
        case = cache.get(record.case_id)
        shape, mode = list(case.image.shape[1:]), case.intensity.mode
        lows.append(case.intensity.low)
        highs.append(case.intensity.high)
        if case.label is not None:
            counts += np.bincount(case.label.ravel().astype(np.int64), minlength=len(counts))[: len(counts)]
    total = counts.sum()
    return {
        "preprocessed_shape": shape,
        "label_names": {str(value): name for value, name in label_names.items()},
        "label_fraction_train": {name: round(float(counts[value] / total), 6) for value, name in label_names.items()}
        if total else {},
        "intensity_train": {"mode": mode, "low": float(np.median(lows)), "high": float(np.median(highs))}
        if lows else {},
    }


def _lost_labels(records: Sequence[CaseRecord], cache: PreprocessedCache) -> dict[str, int]:
    """Cases per label whose label vanished at the target grid: a finding in the text but not in the mask."""
    lost: Counter[str] = Counter()
    for record in records:
        for value in json.loads(cache.metadata(record.case_id).get("lost_labels", "[]")):
            lost[record.label_names.get(value, str(value))] += 1
    return dict(lost)


def _attributes(records: Sequence[CaseRecord]) -> dict[str, dict]:
    keys = sorted({key for record in records for key in record.attributes})
    summary = {}
    for key in keys:
        values = [record.attributes.get(key) for record in records]
        present = [v for v in values if v is not None and v != ""]
        numeric = [v for v in present if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if numeric and len(numeric) == len(present) and len(set(numeric)) > MAX_CATEGORIES:
            summary[key] = {"min": min(numeric), "median": float(np.median(numeric)), "max": max(numeric),
                            "missing": len(values) - len(present)}
        elif len(set(map(str, present))) <= MAX_CATEGORIES:
            summary[key] = dict(Counter(str(v) for v in values if v is not None and v != "").most_common())
            if len(present) < len(values):
                summary[key]["(missing)"] = len(values) - len(present)
    return summary


def format_summary(summary: dict) -> str:
    """Human-readable lines for the terminal."""
    splits = summary["splits"]
    lines = [
        f"cases {summary['dataset_cases']}  patients {summary['patients']}  "
        f"modality {_inline(summary['modality'])}  region {_inline(summary['body_region'])}  "
        f"origin {_inline(summary['origin'])}",
        "splits  " + "  ".join(f"{name} {s['cases']} cases / {s['patients']} patients" for name, s in splits.items()),
        f"source shape {summary['source_shape']['median']} (median)  spacing {summary['source_spacing']['median']} mm"
        f"  ->  preprocessed {summary['preprocessed_shape']}",
        f"labels ({summary['with_label']} cases with a label map): "
        + ", ".join(f"{name} {fraction:.2%}" for name, fraction in summary["label_fraction_train"].items()),
    ]
    if summary["labels_lost_in_preprocessing"]:
        lines.append("warning: labels lost at the target grid (cases): "
                     + _inline(summary["labels_lost_in_preprocessing"]) + "; consider a larger target_shape")
    if summary.get("skipped_constant_images"):
        lines.append("skipped images of a single value (skip_constant), per source: "
                     + _inline(summary["skipped_constant_images"]))
    for key, counts in summary["attributes"].items():
        lines.append(f"  {key}: {_inline(counts)}")
    lines.append(f"licenses: {_inline(summary['licenses'])}")
    lines.append(f"manifest {summary['manifest']}")
    return "\n".join(lines)


def _inline(mapping: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in mapping.items())

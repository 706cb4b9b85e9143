"""The per-sample filter: which scored samples may leave, and why each of the others may not.

Reads the scorecard's ``per_sample.csv`` (one row per scored sample). A sample is dropped when:
- unscored: it is not in the table (nothing is released unscored);
- changed_since_scoring: its image, label map or sidecar is not the one scored (their sha256 differ from the
  table's, or the table recorded none), or its sidecar names another model than the one scored: what is
  released is exactly what was scored;
- privacy: the pixel or embedding copy check flagged it (always; there is no switch);
- derived_from_real: it carries real anatomy (mask bank, inpainting) and the destination is not internal;
- intensity: its intensities leave the real data's range (``release.drop_intensity_outliers``);
- adherence: the real-trained classifier reads another value of a prompted attribute
  (``release.drop_attribute_mismatches``).
The first reason that applies is recorded.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from radsynth.configs.errors import UserInputError
from radsynth.configs.schema import ReleaseConfig
from radsynth.pipelines.sampling.sidecar import SampleDigest

from .samples import ReleaseSample

DROP_REASONS = ("unscored", "changed_since_scoring", "privacy", "derived_from_real", "intensity", "adherence")


@dataclass
class Selection:
    kept: list[ReleaseSample]
    dropped: dict[str, str] = field(default_factory=dict)  # sample id -> reason
    changes: dict[str, str] = field(default_factory=dict)  # sample id -> what differs from what was scored

    @property
    def changed_share(self) -> float:
        """The share of the folder's samples that are not what was scored."""
        return len(self.changes) / max(len(self.kept) + len(self.dropped), 1)

    def summary(self) -> dict:
        counts = Counter(self.dropped.values())
        return {"n_scored": len(self.kept) + len(self.dropped), "n_released": len(self.kept),
                "dropped": {reason: counts.get(reason, 0) for reason in DROP_REASONS},
                "changed_since_scoring": dict(sorted(self.changes.items()))}


def read_per_sample(path: str | Path) -> dict[str, dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise UserInputError(path, "per-sample table not found: the samples are not scored", "run `radsynth evaluate`")
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if rows and "sample_id" not in rows[0]:
        raise UserInputError(path, "has no sample_id column", "a per_sample.csv written by `radsynth evaluate`")
    return {row["sample_id"]: row for row in rows}


def select_samples(samples: Sequence[ReleaseSample], per_sample: dict[str, dict[str, str]],
                   settings: ReleaseConfig) -> Selection:
    selection = Selection(kept=[])
    for sample in samples:
        row = per_sample.get(sample.sample_id)
        change = None if row is None else changed_since_scoring(sample, row)
        if change:
            selection.changes[sample.sample_id] = change
        reason = _drop_reason(sample, row, change, settings)
        if reason is None:
            selection.kept.append(sample)
        else:
            selection.dropped[sample.sample_id] = reason
    return selection


def changed_since_scoring(sample: ReleaseSample, row: dict[str, str]) -> str | None:
    """What about ``sample`` differs from the scored row (None: the same bytes and model)."""
    scored = SampleDigest.from_row(row)
    if scored is None:
        return "the scorecard recorded no file digests (scored by an older radsynth): rerun radsynth evaluate"
    changed = sample.digest().differences(scored)
    if row.get("model_hash") and str(sample.sidecar.get("model_hash")) != row["model_hash"]:
        changed.append("model")
    return f"{', '.join(changed)} differ from what was scored" if changed else None


def _drop_reason(sample: ReleaseSample, row: dict[str, str] | None, change: str | None,
                 settings: ReleaseConfig) -> str | None:
    if row is None:
        return "unscored"
    if change:
        return "changed_since_scoring"
    if _true(row.get("flagged")) or _true(row.get("pixel_copy")) or _true(row.get("embedding_copy")):
        return "privacy"
    if sample.derived_from_real and not settings.internal:
        return "derived_from_real"
    if settings.drop_intensity_outliers and _true(row.get("intensity_outside_real_range")):
        return "intensity"
    if settings.drop_attribute_mismatches and any(
            key.endswith("_correct") and row[key] not in ("", None) and not _true(row[key]) for key in row):
        return "adherence"
    return None


def _true(value: str | None) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes")

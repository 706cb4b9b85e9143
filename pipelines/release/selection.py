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

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

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


class PerSampleRow(BaseModel):
    """A row of ``per_sample.csv`` as the release reads it; every other column (conditions, distances, nearest
    ids, attribute checks) is kept as written. Empty cells are "not recorded"."""

    model_config = ConfigDict(extra="allow")

    sample_id: str
    flagged: bool = False
    pixel_copy: bool = False
    embedding_copy: bool = False
    intensity_outside_real_range: bool = False
    image_sha256: str = ""
    label_sha256: str = ""
    sidecar_sha256: str = ""
    model_hash: str = ""

    @model_validator(mode="before")
    @classmethod
    def _empty_cells_are_defaults(cls, row: dict) -> dict:
        return {key: value for key, value in row.items() if value not in ("", None) or key not in cls.model_fields}

    def attribute_mismatch(self) -> bool:
        """The real-trained classifier read another value of a prompted attribute (``<attribute>_correct`` = 0)."""
        return any(key.endswith("_correct") and value not in ("", None) and not _true(value)
                   for key, value in (self.model_extra or {}).items())


def read_per_sample(path: str | Path) -> dict[str, PerSampleRow]:
    path = Path(path)
    if not path.is_file():
        raise UserInputError(path, "per-sample table not found: the samples are not scored", "run `radsynth evaluate`")
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if rows and "sample_id" not in rows[0]:
        raise UserInputError(path, "has no sample_id column", "a per_sample.csv written by `radsynth evaluate`")
    try:
        parsed = [PerSampleRow.model_validate(row) for row in rows]
    except ValidationError as error:
        problem = error.errors()[0]
        raise UserInputError(path, f"column '{problem['loc'][0]}': {problem['msg']}",
                             "a per_sample.csv written by `radsynth evaluate`") from None
    return {row.sample_id: row for row in parsed}


def select_samples(samples: Sequence[ReleaseSample], per_sample: dict[str, PerSampleRow],
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


def changed_since_scoring(sample: ReleaseSample, row: PerSampleRow) -> str | None:
    """What about ``sample`` differs from the scored row (None: the same bytes and model)."""
    scored = SampleDigest.from_row(row.model_dump())
    if scored is None:
        return "the scorecard recorded no file digests (scored by an older radsynth): rerun radsynth evaluate"
    changed = sample.digest().differences(scored)
    if row.model_hash and str(sample.sidecar.get("model_hash")) != row.model_hash:
        changed.append("model")
    return f"{', '.join(changed)} differ from what was scored" if changed else None


def _drop_reason(sample: ReleaseSample, row: PerSampleRow | None, change: str | None,
                 settings: ReleaseConfig) -> str | None:
    if row is None:
        return "unscored"
    if change:
        return "changed_since_scoring"
    if row.flagged or row.pixel_copy or row.embedding_copy:
        return "privacy"
    if sample.derived_from_real and not settings.internal:
        return "derived_from_real"
    if settings.drop_intensity_outliers and row.intensity_outside_real_range:
        return "intensity"
    if settings.drop_attribute_mismatches and row.attribute_mismatch():
        return "adherence"
    return None


def _true(value: str | None) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes")

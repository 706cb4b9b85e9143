"""The scorecard: every number with its interval, its real reference, its feature space and its sample sizes.

One row per (section, metric, feature space, stratum). ``scorecard.json`` holds the rows, the sample sizes,
the privacy verdict and the software versions; ``scorecard.md`` is the same as tables for people;
``per_sample.csv`` is one row per synthetic image (flags, nearest-neighbour ids and distances) for the
release filter and for anyone auditing a single image.
"""

from __future__ import annotations

import csv
import io
import json
import math
import platform
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from radsynth.configs.errors import UserInputError

from ..data.io import write_text
from .bootstrap import Estimate

SOFTWARE = ("radsynth", "torch", "monai", "diffusers", "torchmetrics", "numpy", "scipy")


class ScoreRow(BaseModel):
    """One number of a scorecard (``Scorecard.add``): a value with its interval, its real reference, its space."""

    model_config = ConfigDict(extra="forbid")

    section: str
    metric: str
    feature_space: str = "-"
    stratum: str = "all"
    value: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    sd: float | None = None
    reference_name: str | None = None
    reference_value: float | None = None
    reference_ci_low: float | None = None
    reference_ci_high: float | None = None
    reference_sd: float | None = None
    n: int | None = None
    better: str | None = None
    note: str | None = None


class ScorecardFile(BaseModel):
    """``scorecard.json`` as ``radsynth evaluate`` writes it: the contract the release reads."""

    sizes: dict[str, int]
    verdicts: dict[str, dict]
    rows: list[ScoreRow]
    notes: list[str] = []
    settings: dict = {}
    samples_digest: str = ""
    settings_digest: str = ""
    software: dict[str, str] = {}
    flagged_samples: int = 0


def read_scorecard(path: str | Path) -> dict:
    """A scorecard validated against ``ScorecardFile`` (one line naming the field otherwise), as a plain dict."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(path, "no scorecard: the samples are not scored", "run `radsynth evaluate CONFIG` first")
    try:
        return ScorecardFile.model_validate_json(path.read_bytes()).model_dump()
    except ValidationError as error:
        problem = error.errors()[0]
        where = ".".join(str(part) for part in problem["loc"])
        what = "scorecard is not valid JSON" if problem["type"] == "json_invalid" else \
            f"field '{where}': {problem['msg']}"
        raise UserInputError(path, what, "a scorecard.json written by `radsynth evaluate`") from None


def software_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for package in SOFTWARE:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _number(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _estimate_fields(estimate: Estimate | float | None, prefix: str = "") -> dict:
    if isinstance(estimate, Estimate):
        return {f"{prefix}value": _number(estimate.value), f"{prefix}ci_low": _number(estimate.ci_low),
                f"{prefix}ci_high": _number(estimate.ci_high), f"{prefix}sd": _number(estimate.sd)}
    # A plain number has no interval: the same keys, empty, so every row has the same columns.
    return {f"{prefix}value": _number(estimate), f"{prefix}ci_low": None, f"{prefix}ci_high": None, f"{prefix}sd": None}


@dataclass
class Scorecard:
    sizes: dict[str, int] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    per_sample: list[dict] = field(default_factory=list)
    verdicts: dict[str, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    samples_digest: str = ""  # sha256 over every scored sample's image, label map and sidecar digests
    settings_digest: str = ""  # sha256 of the scoring settings the numbers depend on

    def bind(self, sources: list[dict], settings) -> None:
        """Record what was scored: the samples' file digests (``ImageSet.sources``) and the scoring settings."""
        from ..sampling.sidecar import SampleDigest, samples_digest

        digests = {row["sample_id"]: SampleDigest.from_row(source) for row, source in zip(self.per_sample, sources)}
        self.samples_digest = samples_digest(digests) if digests else ""
        self.settings_digest = scoring_settings_digest(settings)

    def add(self, section: str, metric: str, estimate: Estimate | float | None, *, feature_space: str = "-",
            stratum: str = "all", reference: Estimate | float | None = None, reference_name: str = "",
            n: int | None = None, better: str = "", note: str = "") -> dict:
        """One number. ``reference`` is what real data scores on the same metric at the same n (the floor or
        ceiling the value is read against); ``better`` says which direction is good ("lower", "higher",
        "near reference", "near 0.5")."""
        row = {"section": section, "metric": metric, "feature_space": feature_space, "stratum": stratum,
               **_estimate_fields(estimate), "reference_name": reference_name or None,
               **_estimate_fields(reference, "reference_"), "n": n, "better": better or None, "note": note or None}
        self.rows.append(row)
        return row

    def find(self, section: str, metric: str, feature_space: str = "-", stratum: str = "all") -> dict | None:
        return next((r for r in self.rows if (r["section"], r["metric"], r["feature_space"], r["stratum"])
                     == (section, metric, feature_space, stratum)), None)

    def to_dict(self) -> dict:
        return {"sizes": self.sizes, "verdicts": self.verdicts, "rows": self.rows, "notes": self.notes,
                "settings": self.settings, "samples_digest": self.samples_digest,
                "settings_digest": self.settings_digest, "software": software_versions(),
                "flagged_samples": sum(bool(r.get("flagged")) for r in self.per_sample)}

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        out_dir = Path(out_dir)
        paths = {"json": out_dir / "scorecard.json", "markdown": out_dir / "scorecard.md",
                 "per_sample": out_dir / "per_sample.csv"}
        write_text(paths["per_sample"], self.per_sample_csv())
        write_text(paths["markdown"], self.markdown())
        # The JSON goes last: its presence says the scorecard is complete.
        write_text(paths["json"], json.dumps(self.to_dict(), indent=2, default=_json_default, allow_nan=False) + "\n")
        return paths

    def per_sample_csv(self) -> str:
        columns: list[str] = []
        for row in self.per_sample:
            columns += [key for key in row if key not in columns]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in self.per_sample:
            writer.writerow({k: _cell(v) for k, v in row.items()})
        return buffer.getvalue()

    def markdown(self) -> str:
        lines = ["# radsynth scorecard", ""]
        lines += ["Sample sizes: " + ", ".join(f"{k} {v}" for k, v in self.sizes.items()), ""]
        for name, verdict in self.verdicts.items():
            status = "PASS" if verdict.get("passed") else "FAIL"
            reasons = "; ".join(verdict.get("reasons", [])) or "all checks within limits"
            lines.append(f"**{name}: {status}**: {reasons}")
        lines.append("")
        for section in dict.fromkeys(r["section"] for r in self.rows):
            lines += [f"## {section}", "", "| metric | feature space | stratum | value (95% CI) | reference | n | better |",
                      "|---|---|---|---|---|---|---|"]
            for r in (r for r in self.rows if r["section"] == section):
                reference = f"{r['reference_name']}: {_interval(r, 'reference_')}" if r["reference_name"] else ""
                lines.append(f"| {r['metric']} | {r['feature_space']} | {r['stratum']} | {_interval(r)} | {reference} "
                             f"| {r['n'] if r['n'] is not None else ''} | {r['better'] or ''} |")
            lines.append("")
        if self.notes:
            lines += ["## Notes", "", *(f"- {note}" for note in self.notes), ""]
        flagged = sum(bool(r.get("flagged")) for r in self.per_sample)
        lines += [f"Per-sample table: per_sample.csv ({len(self.per_sample)} samples, {flagged} flagged).", ""]
        versions = software_versions()
        lines += ["Software: " + ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
        return "\n".join(lines)


def scoring_settings_digest(settings) -> str:
    """sha256 of the scoring settings (a ``ScoringConfig``): a scorecard made under other settings is stale."""
    import hashlib

    return hashlib.sha256(json.dumps(settings.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def _format(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4g}"


def _interval(row: dict, prefix: str = "") -> str:
    value = row.get(f"{prefix}value")
    low, high = row.get(f"{prefix}ci_low"), row.get(f"{prefix}ci_high")
    if low is None or high is None:
        return _format(value)
    return f"{_format(value)} ({_format(low)} to {_format(high)})"


def _cell(value: object) -> object:
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.6g}" if math.isfinite(value) else ""
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    return value


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        item = value.item()
        return None if isinstance(item, float) and not math.isfinite(item) else item
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (Path, Estimate)):
        return str(value) if isinstance(value, Path) else value.to_dict()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")

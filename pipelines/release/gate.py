"""Dataset-level release gates, read from a scorecard (``scorecard.json`` as ``radsynth evaluate`` writes it).

Each gate is one check per stratum the scorecard reports: a value, a limit, a comparison and whether it passed.
The gates read the scorecard of every sample scored, before the per-sample filter: a generator that copies often
also leaks in ways the per-sample check misses (copies just under its threshold, membership), so dropping the
flagged samples cannot rescue it. Privacy checks that could not be measured fail; quality checks that do not
apply (no masks) are left out with a note.

Defaults and why (see ``GateConfig``):
- DCR share <= 0.5 + 2 bootstrap SD in the gated feature space (self-supervised by default): one-sided,
  "farther from train than from holdout" is not leakage; 2 SD refuses a private generator about 2.5% of the
  time. The random-CNN space is a sanity baseline, and in z-scored radiomics the samples of an untrained model
  all land on one hub training image (share 1, SD 0, measured on a tiny build), so neither gates.
- copy rate <= holdout rate + 1 point + 2 SE of the difference: the detector flags about 1% of unseen images by
  construction, and with 100 samples one chance flag is already a point.
- minimum DCR above 1% of the holdout's closest distance to train: 0, or the rounding noise of a saved copy, is
  an exact training image.
- membership-inference TPR at 1% FPR <= 2%, or the TPR a signal-free attack exceeds by chance in 5% of draws at
  this sample size, whichever is higher (``membership_tpr_limit``): published attacks on memorising diffusion
  models reach tens of percent.
- coverage >= real floor - 0.05: the synthetic set must cover the real distribution about as well as unseen
  real data of the same size does.
- mask-Dice ratio >= 0.9 per label: images must show what their masks say, to 90% of a real image's Dice.
- intensity: per-label medians within the real data's range (scoring's order-statistic test).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from radsynth.configs.schema import GateConfig
from radsynth.pipelines.scoring.privacy import copy_rate_limit, membership_tpr_limit


@dataclass(frozen=True)
class GateCheck:
    name: str
    stratum: str
    value: float | None
    limit: float | None
    comparison: str  # "<=" or ">=": how value must relate to limit
    passed: bool
    privacy: bool  # privacy checks cannot be overridden
    reason: str

    @property
    def margin(self) -> float | None:
        """How far the value is on the wrong (negative) or right (positive) side of its limit."""
        if self.value is None or self.limit is None:
            return None
        return self.limit - self.value if self.comparison == "<=" else self.value - self.limit


@dataclass
class GateResult:
    checks: list[GateCheck] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(check.passed for check in self.checks)

    @property
    def failed(self) -> list[GateCheck]:
        return [check for check in self.checks if not check.passed]

    def to_dict(self) -> dict:
        return {"passed": self.passed, "notes": self.notes,
                "checks": [{**asdict(check), "margin": check.margin} for check in self.checks]}

    def to_markdown(self) -> str:
        lines = [f"# Release gate: {'PASSED' if self.passed else 'FAILED'}", ""]
        for check in self.failed:
            lines.append(f"- **failed** {check.name} [{check.stratum}]: {check.reason}")
        lines += ["", "| check | stratum | value | limit | result | kind |", "|---|---|---|---|---|---|"]
        for check in self.checks:
            lines.append(f"| {check.name} | {check.stratum} | {_number(check.value)} | {check.comparison} "
                         f"{_number(check.limit)} | {'pass' if check.passed else '**FAIL**'} | "
                         f"{'privacy' if check.privacy else 'quality'} |")
        lines += ["", *(f"- {note}" for note in self.notes)]
        return "\n".join(lines).rstrip() + "\n"


def evaluate_gates(scorecard: dict, gate: GateConfig) -> GateResult:
    """Every configured gate against ``scorecard``; one ``GateCheck`` per stratum."""
    result = GateResult()
    rows = scorecard.get("rows", [])
    sizes = scorecard.get("sizes", {})
    result.checks += _dcr_share(rows, gate)
    result.checks += _copy_rates(rows, gate, sizes)
    result.checks += _min_dcr(rows, gate)
    result.checks += _membership(rows, gate)
    # A quality gate switched off is said so: the card must not read as if every check had been passed.
    if gate.coverage_margin is not None:
        result.checks += _coverage(rows, gate)
    else:
        result.notes.append("coverage: not gated (release.gate.coverage_margin is null)")
    if gate.mask_dice_ratio_min is not None:
        dice = list(_mask_dice(rows, gate))
        result.checks += dice
        if not dice:
            result.notes.append("mask-Dice ratio: not gated (no masks, or no label the segmenter finds on real data)")
    else:
        result.notes.append("mask-Dice ratio: not gated (release.gate.mask_dice_ratio_min is null)")
    if gate.intensity:
        result.checks += _intensity(scorecard.get("verdicts", {}).get("intensity"))
    else:
        result.notes.append("intensity plausibility: not gated (release.gate.intensity is false)")
    return result


def _rows(rows: list[dict], section: str, metric: str, feature_space: str | None = None) -> Iterator[dict]:
    for row in rows:
        if row["section"] == section and row["metric"] == metric and feature_space in (None, row["feature_space"]):
            yield row


def _value(row: dict, key: str = "value") -> float | None:
    value = row.get(key)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _check(name: str, row: dict | None, limit: float | None, comparison: str, privacy: bool, what: str) -> GateCheck:
    stratum = row["stratum"] if row else "all"
    value = _value(row) if row else None
    if value is None or limit is None:
        return GateCheck(name, stratum, value, limit, comparison, False, privacy, f"{what}: not measured")
    passed = value <= limit if comparison == "<=" else value >= limit
    relation = ("<=" if passed else ">") if comparison == "<=" else (">=" if passed else "<")
    return GateCheck(name, stratum, value, limit, comparison, passed, privacy,
                     f"{what} {value:.4g} {relation} limit {limit:.4g}")


def _dcr_share(rows: list[dict], gate: GateConfig) -> list[GateCheck]:
    checks = []
    for row in _rows(rows, "privacy", "dcr_share", gate.feature_space):
        sd = _value(row, "sd")
        limit = None if sd is None else 0.5 + gate.dcr_share_max_sd * sd
        checks.append(_check(f"dcr_share ({row['feature_space']})", row, limit, "<=", True,
                             "share of samples closer to train than to holdout"))
    return checks or [_check(f"dcr_share ({gate.feature_space})", None, None, "<=", True, "DCR share")]


def _copy_rates(rows: list[dict], gate: GateConfig, sizes: dict) -> list[GateCheck]:
    overall = next(_rows(rows, "privacy", "copy_rate"), None)
    if overall is None:
        return [_check("copy_rate", None, None, "<=", True, "copy rate")]
    holdout_rate, n_holdout = _value(overall, "reference_value") or 0.0, sizes.get("holdout")
    checks = []
    for row in [overall, *_rows(rows, "privacy", "copy_rate (pixel or embedding)")]:
        value = _value(row)
        limit = None if value is None else copy_rate_limit(value, holdout_rate, gate.copy_rate_margin, 2.0,
                                                          row.get("n"), n_holdout)
        checks.append(_check("copy_rate", row, limit, "<=", True, "share of samples flagged as copies"))
    return checks


def _min_dcr(rows: list[dict], gate: GateConfig) -> list[GateCheck]:
    row = next(_rows(rows, "privacy", "min_dcr"), None)
    value = _value(row) if row else None
    floor = _value(row, "reference_value") if row else None
    if value is None:
        return [GateCheck("min_dcr", "all", None, None, ">", False, True,
                          "minimum distance to a training record: not measured")]
    # An exact copy that went through 16-bit PNG rounding is not at distance 0; it is still orders of magnitude
    # closer than any unseen real image comes to the training set.
    limit = gate.exact_copy_fraction * floor if floor is not None else 0.0
    passed = value > limit
    return [GateCheck("min_dcr", "all", value, limit, ">", passed, True,
                      f"minimum distance to a training record {value:.4g}" + ("" if passed else
                      f" <= {limit:.4g} ({gate.exact_copy_fraction:g} x the holdout's closest distance): an exact copy"))]


def _membership(rows: list[dict], gate: GateConfig) -> list[GateCheck]:
    row = next(_rows(rows, "privacy", "membership_inference_tpr_at_1pct_fpr"), None)
    limit = membership_tpr_limit(gate.membership_tpr_max, row["n"]) if row and row.get("n") else None
    return [_check("membership_inference_tpr_at_1pct_fpr", row, limit, "<=", True, "membership-inference TPR at 1% FPR")]


def _coverage(rows: list[dict], gate: GateConfig) -> list[GateCheck]:
    checks = []
    for row in _rows(rows, "realism", "coverage", gate.feature_space):
        floor = _value(row, "reference_value")
        checks.append(_check(f"coverage ({row['feature_space']})", row,
                             None if floor is None else floor - gate.coverage_margin, ">=", False,
                             f"coverage (real floor {floor if floor is None else round(floor, 4)})"))
    return checks or [_check(f"coverage ({gate.feature_space})", None, None, ">=", False, "coverage")]


def _mask_dice(rows: list[dict], gate: GateConfig) -> Iterator[GateCheck]:
    # A label the segmenter never finds on real test images has no ceiling (ratio NaN): it is not gated.
    for row in _rows(rows, "adherence", "mask_dice_ratio"):
        if _value(row) is None:
            continue
        yield _check("mask_dice_ratio", row, gate.mask_dice_ratio_min, ">=", False,
                     "segmenter Dice on synthetic over Dice on real test")


def _intensity(verdict: dict | None) -> list[GateCheck]:
    if verdict is None:
        return [GateCheck("intensity", "all", None, None, "==", False, False, "intensity plausibility: not measured")]
    reasons = "; ".join(verdict.get("reasons") or []) or "per-label medians within the real range"
    return [GateCheck("intensity", "all", None, None, "==", bool(verdict["passed"]), False, reasons)]


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"

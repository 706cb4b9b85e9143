"""Dataset-level release gates, read from a scorecard (``scorecard.json`` as ``radsynth evaluate`` writes it).

Each gate is one check per stratum the scorecard reports: a value, a limit, a comparison and whether it passed.
The gates read the scorecard of every sample scored, before the per-sample filter: a generator that copies often
also leaks in ways the per-sample check misses (copies just under its threshold, membership), so dropping the
flagged samples cannot rescue it. The privacy checks are the scorecard verdict's own (``privacy_decision``, where
their rules and defaults are explained); checks that could not be measured fail. Quality checks that do not
apply (no masks) are left out with a note:
- coverage >= real floor - 0.05: the synthetic set must cover the real distribution about as well as unseen
  real data of the same size does.
- mask-Dice ratio >= 0.9 per label: images must show what their masks say, to 90% of a real image's Dice. The
  judge (a segmenter trained on real images) must find each label on real test images at Dice >= 0.5 first, or
  that label fails: a ratio over a judge that cannot see the label is noise.
- intensity: per-label medians within the real data's range (scoring's order-statistic test).
- attribute adherence >= 0.8 per conditioned attribute: a classifier trained on real images reads each prompted
  value off the samples with at least 80% of the balanced accuracy it has on real test images, so a generator
  whose prompts do not steer it is refused, with that reason (the interval is in the reason and the card).
The release adds two checks of its own: the samples are the bytes that were scored (``scored_bytes_check``), and
the scorecard was made under the config's scoring settings (``scoring_settings_check``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from pydantic import BaseModel, ConfigDict

from radsynth.configs.schema import GateConfig, ScoringConfig
from radsynth.pipelines.scoring.privacy_decision import GateCheck, measured_check, privacy_checks, rows_of, value_of
from radsynth.pipelines.scoring.scorecard import scoring_settings_digest

# A few samples rewritten since scoring are dropped; more than this share says the folder is not the one scored.
CHANGED_SHARE_MAX = 0.05


class CheckRecord(BaseModel):
    """One check as the gate report (``gate_report.json``, the provenance's ``gate``) writes it."""

    model_config = ConfigDict(extra="forbid")

    name: str
    stratum: str
    value: float | None
    limit: float | None
    comparison: str
    passed: bool
    privacy: bool
    reason: str
    margin: float | None


class GateReport(BaseModel):
    """The gate's result as released or refused: every check, and what was not gated."""

    model_config = ConfigDict(extra="forbid")

    passed: bool
    notes: list[str]
    checks: list[CheckRecord]


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

    def report(self) -> GateReport:
        return GateReport(passed=self.passed, notes=self.notes,
                          checks=[CheckRecord(**asdict(check), margin=check.margin) for check in self.checks])

    def to_dict(self) -> dict:
        return self.report().model_dump()

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
    """Every configured gate against ``scorecard``; one ``GateCheck`` per stratum. The privacy checks are the
    scorecard verdict's own (``privacy_checks``): one decision, read twice."""
    result = GateResult(privacy_checks(scorecard, gate))
    rows = scorecard.get("rows", [])
    # A quality gate switched off is said so: the card must not read as if every check had been passed.
    if gate.coverage_margin is not None:
        result.checks += _coverage(rows, gate)
    else:
        result.notes.append("coverage: not gated (release.gate.coverage_margin is null)")
    if gate.mask_dice_ratio_min is not None:
        dice = list(_mask_dice(rows, gate))
        result.checks += dice
        if not dice:
            result.notes.append("mask-Dice ratio: not gated (no labelled synthetic maps)")
    else:
        result.notes.append("mask-Dice ratio: not gated (release.gate.mask_dice_ratio_min is null)")
    if gate.intensity:
        result.checks += _intensity(scorecard.get("verdicts", {}).get("intensity"))
    else:
        result.notes.append("intensity plausibility: not gated (release.gate.intensity is false)")
    if gate.attribute_adherence_min is not None:
        adherence = list(_attribute_adherence(rows, gate.attribute_adherence_min))
        result.checks += adherence
        if not adherence:
            result.notes.append("attribute adherence: not gated (no prompted attribute with two or more values "
                                "in the training data)")
    else:
        result.notes.append("attribute adherence: not gated (release.gate.attribute_adherence_min is null)")
    return result


def _coverage(rows: list[dict], gate: GateConfig) -> list[GateCheck]:
    checks = []
    for row in rows_of(rows, "realism", "coverage", gate.feature_space):
        floor = value_of(row, "reference_value")
        checks.append(measured_check(f"coverage ({row['feature_space']})", row,
                             None if floor is None else floor - gate.coverage_margin, ">=", False,
                             f"coverage (real floor {floor if floor is None else round(floor, 4)})"))
    return checks or [measured_check(f"coverage ({gate.feature_space})", None, None, ">=", False, "coverage")]


def _mask_dice(rows: list[dict], gate: GateConfig) -> Iterator[GateCheck]:
    # A label in no synthetic map (and never predicted on one) claims nothing: it is not gated. For every other,
    # the judge must first show it finds the label on real test images. On the demo's pairs a 300-step judge saw
    # effusion on real images at Dice 0.07 (ratio 0.88) and pneumothorax never (so it went ungated); a 3,000-step
    # judge (Dice 0.64, 0.69 on real) read the same kind of samples at 0.23 and 0.37.
    for row in rows_of(rows, "adherence", "mask_dice_ratio"):
        if not row.get("n"):
            continue
        judge = value_of(row, "reference_value")
        if judge is None or judge < gate.mask_dice_judge_min:
            found = "never" if judge is None else f"at Dice {judge:.3g}"
            yield GateCheck("mask_dice_judge", row["stratum"], judge, gate.mask_dice_judge_min, ">=", False, False,
                            f"the real-trained segmenter finds this label on real test images {found} (< "
                            f"{gate.mask_dice_judge_min:g}), so its Dice on synthetic cannot show adherence: train it "
                            f"longer (scoring.segmenter_steps)")
            continue
        yield measured_check("mask_dice_ratio", row, gate.mask_dice_ratio_min, ">=", False,
                     "segmenter Dice on synthetic over Dice on real test")


def _attribute_adherence(rows: list[dict], limit: float) -> Iterator[GateCheck]:
    # An attribute whose ratio could not be measured (its classifier no better than chance on real data) fails:
    # nothing shows that its prompts steer the generator.
    for row in rows_of(rows, "adherence", "attribute_balanced_accuracy_ratio"):
        low, high = value_of(row, "ci_low"), value_of(row, "ci_high")
        interval = f" (95% CI {low:.3g} to {high:.3g})" if low is not None and high is not None else ""
        yield measured_check("attribute_adherence", row, limit, ">=", False,
                             f"{row['stratum']}: classifier balanced accuracy on synthetic over real test{interval}")


def _intensity(verdict: dict | None) -> list[GateCheck]:
    if verdict is None:
        return [GateCheck("intensity", "all", None, None, "==", False, False, "intensity plausibility: not measured")]
    reasons = "; ".join(verdict.get("reasons") or []) or "per-label medians within the real range"
    return [GateCheck("intensity", "all", None, None, "==", bool(verdict["passed"]), False, reasons)]


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def scored_bytes_check(changed_share: float, changes: dict[str, str]) -> GateCheck:
    """The release holds what was scored: samples changed since scoring are dropped, and many of them refuse."""
    passed = changed_share <= CHANGED_SHARE_MAX
    listed = "; ".join(f"{sample_id}: {what}" for sample_id, what in sorted(changes.items())[:10])
    more = f" (and {len(changes) - 10} more)" if len(changes) > 10 else ""
    reason = (f"share of samples changed since scoring {changed_share:.4g} {'<=' if passed else '>'} limit "
              f"{CHANGED_SHARE_MAX:g}" + (f"; dropped: {listed}{more}" if changes else ""))
    return GateCheck("scored_bytes", "all", changed_share, CHANGED_SHARE_MAX, "<=", passed, True, reason)


def scoring_settings_check(scorecard: dict, settings: ScoringConfig) -> GateCheck:
    """The scorecard was made under the scoring settings the config names now: otherwise it is stale."""
    recorded, expected = scorecard.get("settings_digest"), scoring_settings_digest(settings)
    passed = recorded == expected
    reason = ("scored under the config's scoring settings" if passed else
              "the scorecard was made under other scoring settings than the config's (or by an older radsynth): "
              "rerun radsynth evaluate")
    return GateCheck("scoring_settings", "all", None, None, "==", passed, True, reason)

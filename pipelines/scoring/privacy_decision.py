"""The privacy decision, made once from a scorecard's rows: the scorecard's verdict and the release gate read it.

A check is a value, a limit, a comparison and whether it passed. The privacy checks are:
- the DCR share in the self-supervised space at most 0.5 + ``dcr_share_max_sd`` bootstrap SD (one-sided: "farther
  from train than from holdout" is not leakage; 2 SD refuses a private generator about 2.5% of the time);
- the copy rate at most the holdout's rate + ``copy_rate_margin`` + 2 SE of the difference, overall and in every
  stratum of at least ``MIN_GATED_STRATUM`` samples (one chance flag among 3 samples is 33%: smaller strata are
  reported, and their copies count in the overall rate and are dropped one by one by the release filter);
- the minimum DCR above ``exact_copy_fraction`` of the holdout's closest distance (an exact training image, even
  through 16-bit PNG rounding);
- the membership-inference TPR at 1% FPR at most ``membership_tpr_max``, or the TPR a signal-free attack reaches
  by chance in 5% of draws at the attack's n, whichever is higher (``membership_tpr_limit``; 0.0625 at the
  default 64 members);
- and the settings these numbers depend on, which a config may not loosen from the side: privacy is read in
  the self-supervised space, the copy detector is calibrated to ``COPY_DETECTION_RECALL``, the membership attack
  runs on at least ``MIN_MEMBERSHIP_SAMPLES`` members, and the holdout (the reference of every check) has at
  least ``MIN_HOLDOUT_PATIENTS`` patients.
A check that could not be measured fails. The limits themselves come from ``GateConfig``, whose privacy fields
can only be tightened.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from radsynth.configs.schema import GateConfig

from .privacy import copy_rate_limit, membership_tpr_limit

PRIVACY_SPACE = "self_supervised"  # the space trained to see copies: privacy is judged there and nowhere else
COPY_DETECTION_RECALL = 0.95  # the copy detector must find at least this share of the near copies it is shown
MIN_MEMBERSHIP_SAMPLES = 64  # scoring.membership_samples: fewer members make the chance allowance huge (4: 0.75)
MIN_HOLDOUT_PATIENTS = 10  # below this the unseen reference says nothing about what a private generator does
MIN_GATED_STRATUM = 8  # strata with fewer samples are reported, not gated (a fixed rule: no setting moves it)


@dataclass(frozen=True)
class GateCheck:
    name: str
    stratum: str
    value: float | None
    limit: float | None
    comparison: str  # "<=", ">=", ">" or "==": how value must relate to limit
    passed: bool
    privacy: bool  # privacy checks cannot be overridden
    reason: str

    @property
    def margin(self) -> float | None:
        """How far the value is on the wrong (negative) or right (positive) side of its limit."""
        if self.value is None or self.limit is None:
            return None
        return self.limit - self.value if self.comparison == "<=" else self.value - self.limit


def privacy_checks(scorecard: Mapping, gate: GateConfig) -> list[GateCheck]:
    """Every privacy check of a scorecard (``Scorecard.to_dict`` or its JSON) under ``gate``'s limits."""
    rows, sizes, settings = scorecard.get("rows", []), scorecard.get("sizes", {}), scorecard.get("settings", {})
    return [*_settings_checks(settings, sizes), *_dcr_share(rows, gate), *_copy_rates(rows, gate, sizes),
            *_min_dcr(rows, gate), *_membership(rows, gate)]


def privacy_verdict(checks: list[GateCheck]) -> dict:
    """The scorecard's privacy verdict: passed, and the reason of every failed check."""
    failed = [check for check in checks if not check.passed]
    return {"passed": not failed, "reasons": [f"{check.name} [{check.stratum}]: {check.reason}" for check in failed]}


# ------------------------------------------------------------------------------------------------- checks


def rows_of(rows: list[dict], section: str, metric: str, feature_space: str | None = None) -> Iterator[dict]:
    for row in rows:
        if row["section"] == section and row["metric"] == metric and feature_space in (None, row["feature_space"]):
            yield row


def value_of(row: Mapping, key: str = "value") -> float | None:
    value = row.get(key)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def measured_check(name: str, row: Mapping | None, limit: float | None, comparison: str, privacy: bool, what: str) -> GateCheck:
    stratum = row["stratum"] if row else "all"
    value = value_of(row) if row else None
    if value is None or limit is None:
        return GateCheck(name, stratum, value, limit, comparison, False, privacy, f"{what}: not measured")
    passed = value <= limit if comparison == "<=" else value >= limit
    relation = ("<=" if passed else ">") if comparison == "<=" else (">=" if passed else "<")
    return GateCheck(name, stratum, value, limit, comparison, passed, privacy,
                     f"{what} {value:.4g} {relation} limit {limit:.4g}")


def _settings_checks(settings: Mapping, sizes: Mapping) -> list[GateCheck]:
    checks = []

    def require(name: str, ok: bool, value, limit, comparison: str, reason: str) -> None:
        checks.append(GateCheck(name, "all", value, limit, comparison, bool(ok), True,
                                reason if not ok else f"{name.replace('_', ' ')}: as required"))

    spaces = settings.get("feature_spaces") or []
    require("privacy_feature_space", PRIVACY_SPACE in spaces, None, None, "==",
            f"privacy is read in the {PRIVACY_SPACE} space, which scoring.feature_spaces {spaces} leaves out")
    recall = settings.get("copy_detection_recall")
    require("copy_detection_recall", recall is not None and recall >= COPY_DETECTION_RECALL, recall,
            COPY_DETECTION_RECALL, ">=", f"the copy detector was calibrated to recall {recall} "
            f"(scoring.copy_detection_recall); the gate needs {COPY_DETECTION_RECALL}")
    members, enabled = settings.get("membership_samples"), settings.get("membership_inference", True)
    require("membership_samples", bool(enabled) and members is not None and members >= MIN_MEMBERSHIP_SAMPLES,
            members, MIN_MEMBERSHIP_SAMPLES, ">=", f"the membership attack ran with scoring.membership_samples "
            f"{members} (inference {'on' if enabled else 'off'}); the gate needs it on with at least "
            f"{MIN_MEMBERSHIP_SAMPLES}")
    patients = sizes.get("holdout_patients")
    require("holdout_patients", patients is not None and patients >= MIN_HOLDOUT_PATIENTS, patients,
            MIN_HOLDOUT_PATIENTS, ">=", f"the holdout has {patients} patients: every privacy reference is read "
            f"against it, and fewer than {MIN_HOLDOUT_PATIENTS} cannot show what a private generator does "
            "(give data.split.holdout a larger share)")
    return checks


def _dcr_share(rows: list[dict], gate: GateConfig) -> list[GateCheck]:
    checks = []
    for row in rows_of(rows, "privacy", "dcr_share", PRIVACY_SPACE):
        sd = value_of(row, "sd")
        limit = None if sd is None else 0.5 + gate.dcr_share_max_sd * sd
        checks.append(measured_check(f"dcr_share ({PRIVACY_SPACE})", row, limit, "<=", True,
                            "share of samples closer to train than to holdout"))
    return checks or [measured_check(f"dcr_share ({PRIVACY_SPACE})", None, None, "<=", True, "DCR share")]


def holdout_size_key(stratum: str) -> str:
    """The scorecard's size of the holdout a copy rate of ``stratum`` is read against: the holdout, or for a
    translation's source modality (stratum "source modality=ct") that modality's holdout."""
    return "holdout" if stratum == "all" else f"holdout [{stratum}]"


def _copy_rates(rows: list[dict], gate: GateConfig, sizes: Mapping) -> list[GateCheck]:
    # One copy rate per reference (the training images; a translation's source modality's too), each against its
    # own holdout's chance rate; the conditioned attributes' strata against the training images' holdout.
    references = list(rows_of(rows, "privacy", "copy_rate"))
    overall = next((row for row in references if row["stratum"] == "all"), None)
    if overall is None:
        return [measured_check("copy_rate", None, None, "<=", True, "copy rate")]
    strata = [row for row in rows_of(rows, "privacy", "copy_rate (pixel or embedding)")
              if (row.get("n") or 0) >= MIN_GATED_STRATUM]
    checks = []
    for row, reference in [*((row, row) for row in references), *((row, overall) for row in strata)]:
        value = value_of(row)
        limit = None if value is None else copy_rate_limit(
            value, value_of(reference, "reference_value") or 0.0, gate.copy_rate_margin, 2.0, row.get("n"),
            sizes.get(holdout_size_key(reference["stratum"])))
        checks.append(measured_check("copy_rate", row, limit, "<=", True, "share of samples flagged as copies"))
    return checks


def _min_dcr(rows: list[dict], gate: GateConfig) -> list[GateCheck]:
    row = next(rows_of(rows, "privacy", "min_dcr"), None)
    value = value_of(row) if row else None
    floor = value_of(row, "reference_value") if row else None
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
    row = next(rows_of(rows, "privacy", "membership_inference_tpr_at_1pct_fpr"), None)
    limit = membership_tpr_limit(gate.membership_tpr_max, row["n"]) if row and row.get("n") else None
    return [measured_check("membership_inference_tpr_at_1pct_fpr", row, limit, "<=", True,
                  "membership-inference TPR at 1% FPR")]

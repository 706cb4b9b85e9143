"""Prefect artifacts a reader looks at first: the scorecard (table), the gate result (markdown), the report (link)."""

from __future__ import annotations

import re
from pathlib import Path

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from radsynth.pipelines.release.stage import headline_rows


def artifact_key(name: str, what: str) -> str:
    """Prefect keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{name}-{what}".lower()).strip("-")


def scorecard_table(name: str, scorecard: dict) -> None:
    rows = [{"section": row["section"], "metric": row["metric"], "stratum": row["stratum"],
             "space": row.get("feature_space") or "", "value": _number(row.get("value")),
             "95% CI": _interval(row.get("ci_low"), row.get("ci_high")),
             "reference": f"{row.get('reference_name') or ''} {_number(row.get('reference_value'))}".strip(),
             "n": row.get("n")}
            for row in headline_rows(scorecard)]
    verdicts = "; ".join(f"{k}: {'pass' if v.get('passed') else 'FAIL'}" for k, v in scorecard.get("verdicts", {}).items())
    create_table_artifact(rows, key=artifact_key(name, "scorecard"), description=f"Scorecard headline. {verdicts}")


def gate_markdown(name: str, markdown: str) -> None:
    create_markdown_artifact(markdown, key=artifact_key(name, "gate"), description="release gate checks")


def report_link(name: str, report: str | Path) -> None:
    create_link_artifact(Path(report).resolve().as_uri(), link_text="HTML report", key=artifact_key(name, "report"),
                         description=str(report))


def _number(value) -> str:
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _interval(low, high) -> str:
    return "" if low is None or high is None else f"{_number(low)} to {_number(high)}"

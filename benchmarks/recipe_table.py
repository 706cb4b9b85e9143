"""A table of finished builds side by side, for choosing a training recipe by measurement (issue 16).

    python benchmarks/recipe_table.py RUN_DIR [RUN_DIR ...] [--markdown OUT.md]

For each run folder (a ``radsynth build`` or ``train`` + ``generate`` + ``evaluate`` + ``release``): the gate's
decision and every failed check, realism coverage per feature space against its real floor, the privacy figures
(DCR share, copy rate, membership AUC and TPR at 1% FPR), attribute adherence per attribute, and the diffusion
frontier (coverage, DCR share and copy rate per scored step, the chosen one marked) when it was recorded.
Nothing is recomputed: it reads what the stages wrote.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from build_scores import interval

REALISM_SPACES = ("self_supervised", "random_cnn", "radiomics")
PRIVACY = ("dcr_share", "copy_rate", "membership_inference_auc", "membership_inference_tpr_at_1pct_fpr")


def gate_report(run: Path) -> dict | None:
    """The release gate's report: a published version's (in its provenance), else the refusal's."""
    published = sorted(run.glob("release/*/v*/provenance.json"))
    if published:
        return json.loads(published[-1].read_text())["gate"]
    refused = sorted(run.glob("release/*/refused/gate_report.json"))
    return json.loads(refused[-1].read_text()) if refused else None


def scorecard_rows(run: Path) -> list[dict]:
    return json.loads((run / "eval" / "scorecard.json").read_text())["rows"]


def row_value(rows: list[dict], section: str, metric: str, space: str | None = None, stratum: str = "all"):
    for row in rows:
        if (row["section"], row["metric"], row["stratum"]) == (section, metric, stratum) and (
                space is None or row.get("feature_space") == space):
            return row
    return None


def summary(run: Path) -> dict:
    rows = scorecard_rows(run)
    gate = gate_report(run)
    out = {"run": run.name, "gate": None if gate is None else ("released" if gate["passed"] else "refused"),
           "failed": [] if gate is None else [f"{c['name']} [{c['stratum']}] {_fmt(c['value'])} vs {_fmt(c['limit'])}"
                                              for c in gate["checks"] if not c["passed"]]}
    for space in REALISM_SPACES:
        row = row_value(rows, "realism", "coverage", space)
        if row is not None:
            out[f"coverage {space}"] = f"{_fmt(row['value'])} (floor {_fmt(row.get('reference_value'))})"
    for metric in PRIVACY:
        # DCR share as the gate reads it (self-supervised space); the other rows have one space each
        row = row_value(rows, "privacy", metric, "self_supervised") or row_value(rows, "privacy", metric)
        if row is not None:
            out[metric] = interval(row)
    for row in rows:
        if row["section"] == "adherence" and row["metric"] == "attribute_balanced_accuracy_ratio":
            out[f"adherence {row['stratum']}"] = interval(row)
    frontier = run / "train" / "diffusion" / "frontier" / "frontier.csv"
    if frontier.is_file():
        with open(frontier, newline="") as handle:
            out["frontier"] = [
                f"{p['step']}: cov {float(p['coverage']):.2f}, dcr {float(p['dcr_share']):.2f}, "
                f"copies {float(p['copy_rate']):.2f}{' *' if p['chosen'] == 'True' else ''}"
                for p in csv.DictReader(handle)]
    return out


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)


def markdown(summaries: list[dict]) -> str:
    keys = [key for key in dict.fromkeys(k for s in summaries for k in s) if key not in ("run", "frontier", "failed")]
    lines = ["| | " + " | ".join(s["run"] for s in summaries) + " |", "|---|" + "---|" * len(summaries)]
    for key in [*keys, "failed", "frontier"]:
        cells = [s.get(key, "-") for s in summaries]
        cells = ["; ".join(c) if isinstance(c, list) else str(c) for c in cells]
        lines.append(f"| {key} | " + " | ".join(cells or ["-"]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    args = parser.parse_args()
    table = markdown([summary(run) for run in args.runs])
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")


if __name__ == "__main__":
    main()

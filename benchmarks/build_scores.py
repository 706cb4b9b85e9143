"""What the figure benchmarks share: run one ``radsynth build`` in a subprocess and read its scorecard's rows.

Imported by the benchmark scripts beside it (``python benchmarks/<script>.py`` puts this folder on the path).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROWS = {("realism", "coverage"), ("adherence", "attribute_balanced_accuracy_ratio"),
        ("privacy", "membership_inference_auc"), ("privacy", "dcr_share"), ("privacy", "copy_rate")}


def figure_arguments(doc: str) -> argparse.ArgumentParser:
    """The arguments every figure script takes: a config, the base model it starts from, an output folder."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    return parser


def run_build(config: str, out: Path, overrides: list[str], what: str) -> dict:
    """``radsynth build CONFIG runtime.output_dir=OUT ...``; its seconds, exit code and the scorecard rows in ROWS.

    Exit 3 (the release gate refused) still leaves a scorecard: a refused build is a result, not a failure.
    """
    command = [sys.executable, "-m", "radsynth.flows.cli", "build", config, f"runtime.output_dir={out}", *overrides,
               "--json"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode not in (0, 3):
        raise SystemExit(f"build {what} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    scorecard = json.loads((out / "eval" / "scorecard.json").read_text())
    rows = [{key: row.get(key) for key in ("section", "metric", "feature_space", "stratum", "value", "ci_low",
                                            "ci_high", "reference_value", "reference_ci_low", "reference_ci_high")}
            for row in scorecard["rows"] if (row["section"], row["metric"]) in ROWS
            and (row["stratum"] == "all" or row["section"] == "adherence")]
    return {"build_exit": done.returncode, "build_seconds": round(seconds, 1), "rows": rows,
            "nearest_neighbours": distinct_nearest_neighbours(out / "eval" / "per_sample.csv")}


def distinct_nearest_neighbours(per_sample: Path) -> dict:
    """How many different training images are the samples' nearest neighbours (pixels, embedding): a model that
    reproduces a few training images has few; each as a share of the samples."""
    with open(per_sample, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("is_synthetic") in ("True", "true", "1")]
    found = {}
    for space in ("pixel", "embedding"):
        ids = [row[f"{space}_nn_id"] for row in rows if row.get(f"{space}_nn_id")]
        found[space] = {"distinct": len(set(ids)), "samples": len(ids),
                        "share": round(len(set(ids)) / len(ids), 4) if ids else None}
    return found


def pick(result: dict, section: str, metric: str, space: str | None = None) -> dict | None:
    for row in result["rows"]:
        if row["section"] == section and row["metric"] == metric and (space is None or row["feature_space"] == space):
            return row
    return None


def interval(row: dict | None) -> str:
    if not row or row.get("value") is None:
        return "n/a"
    if row.get("ci_low") is None:
        return f"{row['value']:.3g}"
    return f"{row['value']:.3g} ({row['ci_low']:.3g}-{row['ci_high']:.3g})"


def machine() -> dict:
    return {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version()}


def error_bars(rows: list[dict]) -> tuple[list[float], list[float], list[list[float]]]:
    """Values, and matplotlib's [below, above] error lengths from each row's interval (0 where it has none)."""
    values = [row.get("value", math.nan) if row.get("value") is not None else math.nan for row in rows]
    below = [v - row["ci_low"] if row.get("ci_low") is not None else 0.0 for v, row in zip(values, rows)]
    above = [row["ci_high"] - v if row.get("ci_high") is not None else 0.0 for v, row in zip(values, rows)]
    return values, below, above


def save_figure(figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path

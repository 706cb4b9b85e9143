"""Progress of long loops inside Prefect: log lines through the run logger and a progress artifact.

Training is followed from outside: a thread reads the metrics.csv each training part appends to, so the
same view works for a run in this process and for an ``accelerate launch`` subprocess.
"""

from __future__ import annotations

import csv
import threading
from pathlib import Path

from prefect.artifacts import create_progress_artifact, update_progress_artifact


class TrainingProgress:
    """Context manager: while open, reports each part's latest logged step as "part step/max_steps (loss)"."""

    def __init__(self, parts: dict[str, tuple[Path, int]], logger, key: str, every_s: float = 30.0):
        self.parts, self.logger, self.key, self.every_s = parts, logger, key, every_s
        self._stop = threading.Event()
        self._reported: dict[str, int] = {}
        self._thread = threading.Thread(target=self._follow, name="training-progress", daemon=True)
        self._artifact = None

    def __enter__(self) -> TrainingProgress:
        self._artifact = create_progress_artifact(0.0, key=self.key, description="training steps done, all parts")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.report()

    def _follow(self) -> None:
        while not self._stop.wait(self.every_s):
            self.report()

    def report(self) -> None:
        done = total = 0
        for name, (metrics, max_steps) in self.parts.items():
            step, loss = last_logged_step(metrics)
            done, total = done + min(step, max_steps), total + max_steps
            if step > self._reported.get(name, 0):
                self._reported[name] = step
                self.logger.info("%s step %d/%d%s", name, step, max_steps, f", loss {loss:.4g}" if loss is not None else "")
        if self._artifact is not None and total:
            update_progress_artifact(self._artifact, 100.0 * done / total)


def last_logged_step(metrics: Path) -> tuple[int, float | None]:
    """The last training step in a metrics.csv and its loss (0, None before the first log)."""
    if not metrics.is_file():
        return 0, None
    step, loss = 0, None
    with open(metrics, newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get("kind") == "train" and row.get("step", "").isdigit():
                if int(row["step"]) != step:
                    step, loss = int(row["step"]), None
                if row.get("name") == "loss":
                    loss = float(row["value"])
    return step, loss

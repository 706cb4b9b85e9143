"""What sampling cost, per sample: ``<sample folder>/.sampling-compute.jsonl``, one line per generated batch (the
samples it wrote, its seconds, joules and device), appended after the batch's samples are written.

Hidden like a writer's temporaries, so scoring, the sample-folder digest and the release never read it as a
sample: the scored bytes are the samples' alone, whatever a run's timing was. A batch killed before its line is
written is not counted; its rerun is.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

__all__ = ["COMPUTE_LOG", "log_batch", "sampling_compute"]

COMPUTE_LOG = ".sampling-compute.jsonl"


def log_batch(sample_dir: Path, sample_ids: Sequence[str], seconds: float, joules: float | None, device: str) -> None:
    line = json.dumps({"samples": list(sample_ids), "seconds": round(seconds, 4),
                       "energy_j": None if joules is None else round(joules, 2), "device": device})
    with open(Path(sample_dir) / COMPUTE_LOG, "a") as handle:  # one short append: shards may share the folder
        handle.write(line + "\n")


def sampling_compute(sample_dir: Path, sample_ids: Sequence[str]) -> dict | None:
    """Mean seconds (and joules) per image over ``sample_ids``, each charged its share of the batch that last wrote
    it; None when the log knows none of them (samples from elsewhere, or from before compute was logged)."""
    path = Path(sample_dir) / COMPUTE_LOG
    if not path.is_file():
        return None
    per_sample = {}
    for line in path.read_text().splitlines():
        try:
            batch = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        share = len(batch["samples"]) or 1
        joules = None if batch["energy_j"] is None else batch["energy_j"] / share
        per_sample.update({sample: (batch["seconds"] / share, joules, batch["device"]) for sample in batch["samples"]})
    known = [per_sample[sample] for sample in sample_ids if sample in per_sample]
    if not known:
        return None
    energies = [joules for _, joules, _ in known]
    return {"images": len(known), "seconds_per_image": round(sum(s for s, _, _ in known) / len(known), 4),
            "energy_j_per_image": None if None in energies else round(sum(energies) / len(known), 3),
            "devices": sorted({device for _, _, device in known})}

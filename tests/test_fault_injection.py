"""Fault injection: generate, evaluate and release killed (SIGKILL) at ten points, then run again. The reruns end
with the same samples and scorecard as an uninterrupted build, no partial release, and no temporary, staging or
partial file left anywhere."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from radsynth.pipelines.release.publish import latest, verify_manifest, versions

from .test_flows import clean_env, radsynth
from .test_release_stage import scored_build

KILL_DELAYS = {"generate": (0.0, 0.4, 1.0, 2.0), "evaluate": (1.0, 4.0, 8.0), "release": (0.0, 0.5, 1.2)}


def kill_after(argv: list[str], delay: float, started) -> bool:
    """Run ``radsynth argv``, wait until ``started()`` holds, then ``delay`` seconds, and SIGKILL it.

    Returns whether it was still running when killed (a kill that came too late still counts as a run)."""
    process = subprocess.Popen([sys.executable, "-m", "radsynth.flows.cli", *argv], env=clean_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not started() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(delay)
    running = process.poll() is None
    if running:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return running


def scorecard_numbers(folder: Path) -> tuple[list[dict], list[dict]]:
    """What a scorecard says, without when and on what it ran (timings, software versions)."""
    card = json.loads((folder / "scorecard.json").read_text())
    with (folder / "per_sample.csv").open(newline="") as handle:
        return card["rows"], list(csv.DictReader(handle))


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if ".tmp" in p.name or p.name.startswith((".staging-", ".trash-", ".partial")) or
                  p.name.endswith(".partial"))


@pytest.mark.slow
def test_builds_killed_at_ten_points_rerun_to_the_uninterrupted_result(tmp_path):
    config, config_path, run_dir = scored_build(tmp_path / "reference")  # trained, 12 samples: uninterrupted
    samples, scored, destination = tmp_path / "samples", tmp_path / "eval", tmp_path / "release"
    common = [str(config_path), f"release.destination={destination}"]
    killed_while_running = 0

    for delay in KILL_DELAYS["generate"]:
        killed_while_running += kill_after(["generate", *common, "--n", "12", "--out", str(samples)], delay,
                                           lambda: samples.is_dir() and any(samples.iterdir()))
    done = radsynth("generate", *common, "--n", "12", "--out", str(samples), "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    reference = run_dir / "samples"
    assert sorted(p.name for p in samples.iterdir()) == sorted(p.name for p in reference.iterdir())
    for sidecar in reference.glob("*.json"):  # the same seeds, settings and model
        assert json.loads((samples / sidecar.name).read_text()) == json.loads(sidecar.read_text())
    # A resumed run draws each sample in its own batch: the same bytes as an uninterrupted run of the same command.
    # (Compared with a fresh process, not with the reference above: that ran inside pytest, whose torch state
    # earlier tests may have changed.)
    uninterrupted_samples = tmp_path / "samples-uninterrupted"
    assert radsynth("generate", *common, "--n", "12", "--out", str(uninterrupted_samples)).returncode == 0
    for image in uninterrupted_samples.glob("*.png"):
        assert (samples / image.name).read_bytes() == image.read_bytes(), image.name

    uninterrupted = tmp_path / "eval-uninterrupted"
    assert radsynth("evaluate", *common, "--samples", str(samples), "--out", str(uninterrupted)).returncode == 0
    for delay in KILL_DELAYS["evaluate"]:
        killed_while_running += kill_after(["evaluate", *common, "--samples", str(samples), "--out", str(scored)],
                                           delay, lambda: True)
    done = radsynth("evaluate", *common, "--samples", str(samples), "--out", str(scored), "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert scorecard_numbers(scored) == scorecard_numbers(uninterrupted)

    root = destination / config.data.name
    for delay in KILL_DELAYS["release"]:
        killed_while_running += kill_after(["release", *common, "--samples", str(samples), "--eval", str(scored)],
                                           delay, lambda: root.is_dir())
        for version in versions(root):
            verify_manifest(version)  # a version folder is complete, whenever the kill came
    done = radsynth("release", *common, "--samples", str(samples), "--eval", str(scored), "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert [v.name for v in versions(root)] == ["v1"] and latest(root).name == "v1"
    verify_manifest(latest(root))

    assert killed_while_running >= 7, "most kills must land while the command runs"
    assert leftovers(tmp_path) == []

"""How scoring grows with the set sizes: time and peak memory per phase, first run and with the real side cached.

    python benchmarks/scoring_scale.py [scoring.key=value ...] [--size 64] [--sizes 500 1000 2000]

For each n (one fresh process per n, so peak memory is that n's): built-in chest phantoms at 64x64 are ingested
into a temporary folder; train = n training cases, and two disjoint sets of n other training cases stand in for
a generator's output (real images with their own masks as conditioning masks, written as NIfTI pairs with
sidecars and read back as ``radsynth evaluate`` reads samples, under ``scoring.synthetic_memory_mb``); holdout and
test are the splits (about 0.43 n each). The demo's scoring settings are used. Scored twice against the same real
side:
- first: nothing cached (self-supervised encoder, real features, floors, calibrations, real-only models);
- cached: a fresh synthetic set of the same size, the real side read back from the first run's cache.
Per phase (reading the samples is "loading"): seconds and peak memory, sampled every 50 ms, both resident and
anonymous (resident minus file-backed pages: what a set held on disk does not add). The reference, measured in
the same process, is one brute-force pixel correlation of every sample with every training image (an
n x n x pixels product); the growth from the smallest to the largest n is reported as an exponent (time ~ n^k: 1
is linear).
Prints one JSON object with the machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch
from score_2d import brute_force_correlation_seconds  # the same reference as score_2d.py (benchmarks/ is on the path)

from radsynth.configs import load_config
from radsynth.pipelines.data.ingest import ingest
from radsynth.pipelines.sampling.writers import write_sample
from radsynth.pipelines.scoring.evaluate import ScoringInputs, score
from radsynth.pipelines.scoring.loading import cached_split, sample_set


class PhaseMemory:
    """Peak resident and anonymous memory per scoring phase: phases start at the scorer's "scoring: <phase>" log
    lines (or ``log("scoring: <phase>")`` by the caller)."""

    def __init__(self) -> None:
        self.phase, self.peaks, self.anonymous_peaks = "setup", {}, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def log(self, line: str) -> None:
        if line.startswith("scoring: ") and " " not in line[len("scoring: "):]:
            self.phase = line[len("scoring: "):]

    def _sample(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.wait(0.05):
            with open("/proc/self/statm") as statm:
                resident, shared = (int(field) * page for field in statm.read().split()[1:3])
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), resident)
            self.anonymous_peaks[self.phase] = max(self.anonymous_peaks.get(self.phase, 0), resident - shared)

    def __enter__(self) -> PhaseMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def one_size(n: int, size: int, overrides: list[str]) -> dict:
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as run_dir:
        n_cases = math.ceil(n * 3 / 0.7) + 10  # the default split keeps ~70% for training: train + two "synthetic"
        config = load_config("demo", [f"runtime.output_dir={run_dir}", f"data.phantom.n_cases={n_cases}",
                                      f"data.preprocess.target_shape=[{size},{size}]", *overrides])
        ingest(config, progress=False)
        pool = cached_split(config, "train")
        holdout, test = cached_split(config, "holdout"), cached_split(config, "test")
        train = pool.subset(range(n))
        folders = {name: write_stand_ins(pool.subset(range(start, start + n)), os.path.join(run_dir, f"samples-{name}"))
                   for name, start in (("first", n), ("cached", 2 * n))}
        del pool  # the stand-ins are read back from their files, as a generator's samples are
        runs = {}
        for name, folder in folders.items():
            with PhaseMemory() as memory:
                started = time.perf_counter()
                memory.log("scoring: loading")
                synthetic = sample_set(folder, train, memory_mb=config.scoring.synthetic_memory_mb)
                loading = time.perf_counter() - started
                inputs = ScoringInputs(synthetic, train, holdout, test, attributes=list(config.conditioning.attributes))
                result = score(inputs, config.scoring, os.path.join(run_dir, f"eval-{name}"), seed=0, log=memory.log,
                               cache_dir=os.path.join(run_dir, "scoring-cache"))
                seconds = time.perf_counter() - started
            reference = brute_force_correlation_seconds(np.asarray(synthetic.images), train.images)
            runs[name] = {"seconds": round(seconds, 1), "reference_seconds": round(reference, 3),
                          "over_reference": round(seconds / reference, 1),
                          "phase_seconds": {"loading": round(loading, 2), **result.seconds},
                          "phase_peak_mb": {k: round(v / 2**20) for k, v in memory.peaks.items()},
                          "phase_peak_anonymous_mb": {k: round(v / 2**20) for k, v in memory.anonymous_peaks.items()},
                          "synthetic_on_disk": isinstance(synthetic.images, np.memmap)}
        return {"n_synthetic": n, "n_train": n, "n_holdout": len(holdout), "n_test": len(test),
                "image_shape": [size, size], **runs}


def write_stand_ins(image_set, folder: str) -> str:
    """Real cases written as a generator writes pairs (NIfTI image + label map + sidecar), in physical units."""
    for index, (physical, label, prompt, conditions) in enumerate(zip(
            image_set.intensity.inverse(image_set.images), image_set.masks, image_set.prompts, image_set.conditions)):
        write_sample(folder, f"syn_{index:06d}", physical, image_set.spacing, "nifti",
                     {"prompt": prompt, "conditions": conditions, "seed": index, "scheduler": "stand-in",
                      "num_inference_steps": 0, "guidance_scale": 0.0, "model_hash": "stand-in"}, label=label)
    return folder


def growth(rows: list[dict], run: str, phase: str | None = None) -> float | None:
    """Exponent k of time ~ n^k between the smallest and the largest n."""
    first, last = rows[0], rows[-1]
    if phase is None:
        t0, t1 = first[run]["seconds"], last[run]["seconds"]
    else:
        t0, t1 = first[run]["phase_seconds"].get(phase), last[run]["phase_seconds"].get(phase)
    if not t0 or not t1 or first["n_synthetic"] == last["n_synthetic"]:
        return None
    return round(math.log(t1 / t0) / math.log(last["n_synthetic"] / first["n_synthetic"]), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 1000, 2000])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="scoring.key=value")
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(one_size(args.child, args.size, args.overrides)))
        return
    rows = []
    for n in sorted(args.sizes):  # one after the other: two torch processes on a small CPU slow each other down
        child = subprocess.run([sys.executable, __file__, "--child", str(n), "--size", str(args.size),
                                *args.overrides], check=True, capture_output=True, text=True)
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr)
    phases = sorted(rows[-1]["first"]["phase_seconds"])
    print(json.dumps({
        "sizes": rows,
        "growth_exponent": {run: {"total": growth(rows, run), **{p: growth(rows, run, p) for p in phases}}
                            for run in ("first", "cached")},
        "settings": "demo" + (" " + " ".join(args.overrides) if args.overrides else ""),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
                    "torch": torch.__version__},
    }, indent=1))


if __name__ == "__main__":
    main()

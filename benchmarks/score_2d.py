"""Time to score N 2D samples against N training images, per stage, next to a reference in the same run.

    python benchmarks/score_2d.py --n 1000 [--size 64] [scoring.key=value ...]

Images are built-in chest phantoms (64x64 with lung/heart/finding masks), ingested once into a temporary
folder: train = N training cases, "synthetic" = N other training cases (real images standing in for a
generator's output, with their own masks as conditioning masks), holdout and test = the holdout and test
splits. The reference is the floor of any privacy audit: one brute-force pixel correlation of every sample
with every training image (a single N x N x pixels matrix product). Prints one JSON object with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np
import torch

from radsynth.configs import load_config, load_scoring_config
from radsynth.pipelines.data.ingest import ingest
from radsynth.pipelines.scoring.evaluate import ScoringInputs, score
from radsynth.pipelines.scoring.loading import cached_split


def brute_force_correlation_seconds(synthetic: np.ndarray, train: np.ndarray) -> float:
    started = time.perf_counter()
    a = torch.from_numpy(synthetic.reshape(len(synthetic), -1)).double()
    b = torch.from_numpy(train.reshape(len(train), -1)).double()
    a = (a - a.mean(1, keepdim=True)) / a.std(1, keepdim=True)
    b = (b - b.mean(1, keepdim=True)) / b.std(1, keepdim=True)
    (a @ b.T).max(1)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("overrides", nargs="*", help="scoring.key=value")
    args = parser.parse_args()
    settings = load_scoring_config(args.overrides)
    torch.set_num_threads(os.cpu_count() or 1)

    with tempfile.TemporaryDirectory() as run_dir:
        n_cases = int(args.n * 2 / 0.7) + 10  # the default split keeps ~70% for training
        config = load_config("demo", [f"runtime.output_dir={run_dir}", f"data.phantom.n_cases={n_cases}",
                                      f"data.preprocess.target_shape=[{args.size},{args.size}]"])
        started = time.perf_counter()
        ingest(config, progress=False)
        ingest_seconds = time.perf_counter() - started
        pool = cached_split(config, "train")
        train, synthetic = pool.subset(range(args.n)), pool.subset(range(args.n, 2 * args.n))
        synthetic.is_synthetic, synthetic.groups, synthetic.name = True, list(synthetic.ids), "synthetic"
        inputs = ScoringInputs(synthetic, train, cached_split(config, "holdout"), cached_split(config, "test"),
                               attributes=list(config.conditioning.attributes))
        reference = brute_force_correlation_seconds(synthetic.images, train.images)
        started = time.perf_counter()
        result = score(inputs, settings, os.path.join(run_dir, "eval"), log=lambda _: None)
        total = time.perf_counter() - started

    print(json.dumps({
        "n_synthetic": len(synthetic), "n_train": len(train), "n_holdout": len(inputs.holdout),
        "n_test": len(inputs.test), "image_shape": list(train.images.shape[1:]),
        "score_seconds": round(total, 1), "stage_seconds": result.seconds,
        "reference_brute_force_pixel_correlation_seconds": round(reference, 3),
        "score_over_reference": round(total / reference, 1),
        "ingest_seconds": round(ingest_seconds, 1), "settings": " ".join(args.overrides) or "defaults",
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
    }))


if __name__ == "__main__":
    main()

"""Time the scoring feature spaces on one thread: radiomics (F1), random CNN (F0), self-supervised (F2).

    OMP_NUM_THREADS=1 python benchmarks/feature_spaces.py [--n2d 1000] [--n3d 100] [--ssl-steps 20] [--repeats 3]

Images are smoothed noise on [-1, 1] (2D 64 x 64, 3D 32^3) with a 3-label mask. F2 reports seconds per
training step (batch 64, 2D) and extraction time after a short fit. Prints one JSON object (best of repeats).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch
from scipy import ndimage

from radsynth.pipelines.scoring.features import (
    RadiomicsFeatures,
    RandomCNNFeatures,
    SelfSupervisedEncoder,
)


def images(shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.normal(size=shape), sigma=(0,) + (1.5,) * (len(shape) - 1))
    array = np.clip(smooth / (3 * smooth.std()), -1, 1).astype(np.float32)
    return array, np.digitize(array, [-0.2, 0.2])


def best_time(repeats: int, call, *args) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call(*args)
        times.append(time.perf_counter() - start)
    return round(min(times), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n2d", type=int, default=1000)
    parser.add_argument("--n3d", type=int, default=100)
    parser.add_argument("--ssl-steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report: dict = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
                    "torch": torch.__version__, "seconds": {}}
    seconds = report["seconds"]
    for tag, shape, dims in (("2d", (args.n2d, 64, 64), 2), ("3d", (args.n3d, 32, 32, 32), 3)):
        x, masks = images(shape, seed=0)
        key = f"{shape[0]}x{'x'.join(map(str, shape[1:]))}"
        seconds[f"radiomics_{key}"] = best_time(args.repeats, RadiomicsFeatures(dims).extract, x)
        labelled = RadiomicsFeatures(dims, labels=[0, 1, 2])
        seconds[f"radiomics_3labels_{key}"] = best_time(args.repeats, labelled.extract, x, masks)
        seconds[f"random_cnn_{key}"] = best_time(args.repeats, RandomCNNFeatures(dims).extract, x)
        encoder = SelfSupervisedEncoder(dims, seed=0)
        start = time.perf_counter()
        encoder.fit(x, steps=args.ssl_steps, batch_size=64)
        seconds[f"self_supervised_per_step_{tag}_batch64"] = round((time.perf_counter() - start) / args.ssl_steps, 3)
        seconds[f"self_supervised_extract_{key}"] = best_time(args.repeats, encoder.extract, x)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""Time each realism metric on two sets of Gaussian features (default 1000 vs 1000, 128 features, one thread).

    OMP_NUM_THREADS=1 python benchmarks/realism_metrics.py [--n 1000] [--dim 128] [--threads 1] [--boot 0]
        [--scorecard 0]

MS-SSIM diversity is timed on 64 x 64 images (all pairs of 64 images) and 32^3 volumes (50 pairs).
--boot N also times one ``with_real_floor`` FD call with N bootstrap replicates.
--scorecard N times one feature space's realism rows as the scorecard computes them, at the demo's sizes (64
synthetic, 1,679 train, 721 unseen real) with N half-samples: ``set_metrics`` (one distance pass per pair of
sets) against the separate metric functions in the same run, and prints the ratio. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from radsynth.pipelines.scoring.diversity import ms_ssim_diversity
from radsynth.pipelines.scoring.realism import (
    density_coverage,
    fd_infinity,
    frechet_distance_features,
    kernel_inception_distance,
    median_bandwidth,
    precision_recall,
    rbf_mmd,
    set_metrics,
    with_real_floor,
)


def timed(function, *args, **kwargs) -> float:
    start = time.perf_counter()
    function(*args, **kwargs)
    return round(time.perf_counter() - start, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--boot", type=int, default=0)
    parser.add_argument("--scorecard", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    fake, real = rng.standard_normal((args.n, args.dim)), rng.standard_normal((args.n, args.dim)) + 0.1
    seconds = {
        "fd": timed(frechet_distance_features, fake, real),
        "fd_infinity_15_points": timed(fd_infinity, fake, real, seed=0),
        "kid_whole_sets": timed(kernel_inception_distance, fake, real, subset_size=args.n),
        "kid_100_subsets_of_half": timed(kernel_inception_distance, fake, real, subsets=100, subset_size=args.n // 2),
        "rbf_mmd_median_bandwidth": timed(rbf_mmd, fake, real),
        "precision_recall_k3": timed(precision_recall, real, fake, k=3),
        "density_coverage_k5": timed(density_coverage, real, fake, k=5),
        "ms_ssim_2d_64px_2016_pairs": timed(ms_ssim_diversity, rng.uniform(-1, 1, (64, 64, 64)), n_pairs=2016),
        "ms_ssim_3d_32px_50_pairs": timed(ms_ssim_diversity, rng.uniform(-1, 1, (20, 32, 32, 32)), n_pairs=50),
    }
    if args.boot:
        groups = [str(i) for i in range(args.n)]
        seconds[f"fd_with_real_floor_{args.boot}_boot"] = timed(
            with_real_floor, frechet_distance_features, fake, real, fake + 0.05, None, groups, groups,
            n_boot=args.boot)
    if args.scorecard:
        seconds["scorecard_realism_one_space"] = scorecard_realism(rng, args.dim, args.scorecard)
    print(json.dumps({"n": args.n, "dim": args.dim, "threads": args.threads, "seconds": seconds,
                      "machine": platform.processor() or platform.machine(), "torch": torch.__version__}, indent=1))


def scorecard_realism(rng: np.random.Generator, dim: int, replicates: int) -> dict[str, float]:
    synthetic, train, unseen = (rng.standard_normal((n, dim)) for n in (64, 1679, 721))
    groups = [[f"s{i}" for i in range(64)], [f"t{i}" for i in range(1679)], [f"u{i}" for i in range(721)]]
    bandwidth = median_bandwidth(train, unseen)

    def separate(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
        precision, recall = precision_recall(b, a)
        density, coverage = density_coverage(b, a)
        return {"frechet_distance": frechet_distance_features(a, b),
                "kid": kernel_inception_distance(a, b, subsets=5)[0], "rbf_mmd": rbf_mmd(a, b, bandwidth=bandwidth),
                "precision": precision, "recall": recall, "density": density, "coverage": coverage}

    times = {name: timed(with_real_floor, metrics, synthetic, train, unseen, *groups, n_boot=replicates)
             for name, metrics in (("separate_functions", separate),
                                   ("set_metrics", lambda a, b: set_metrics(a, b, bandwidth, kid_subsets=5)))}
    return {**times, "speedup": round(times["separate_functions"] / times["set_metrics"], 2)}


if __name__ == "__main__":
    main()

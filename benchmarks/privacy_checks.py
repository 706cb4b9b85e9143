"""Time the privacy checks (one thread by default): pixel nearest neighbours and the DCR share with its bootstrap.

    OMP_NUM_THREADS=1 python benchmarks/privacy_checks.py [--n 1000] [--threads 1] [--boot 200] [--dim 128]

Pixel NN: n synthetic vs n training 2D images at 64x64 and at 256x256 (area-downsampled to 64x64 first), with the
defaults (max_shift 2, flips on both axes: 75 searches). DCR share: n x n x n Gaussian features of ``--dim``
dimensions with ``--boot`` joint bootstrap replicates (one patient per row). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from radsynth.pipelines.scoring.nearest_neighbours import chunked_nearest_neighbours
from radsynth.pipelines.scoring.privacy import (
    authenticity_report,
    dcr_share,
    pixel_nearest_neighbours,
)


def timed(function, *args, **kwargs) -> float:
    start = time.perf_counter()
    function(*args, **kwargs)
    return round(time.perf_counter() - start, 3)


def smooth_images(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    field = gaussian_filter(rng.standard_normal((n, size, size), dtype=np.float32), (0, size / 20, size / 20))
    return np.tanh(field / field.std()).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--boot", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    seconds = {}
    for size in (64, 256):
        synthetic, train = smooth_images(rng, args.n, size), smooth_images(rng, args.n, size)
        seconds[f"pixel_nn_{size}px"] = timed(pixel_nearest_neighbours, synthetic, train)
    features = [rng.standard_normal((args.n, args.dim)).astype(np.float32) for _ in range(3)]
    groups = [str(i) for i in range(args.n)]
    seconds[f"dcr_share_{args.boot}_boot"] = timed(dcr_share, *features, groups, groups, groups, n_boot=args.boot)
    seconds["dcr_share_no_boot"] = timed(dcr_share, *features, groups, groups, groups, n_boot=0)
    seconds["authenticity_report"] = timed(authenticity_report, *features)
    seconds["nn_euclidean_k1"] = timed(chunked_nearest_neighbours, features[0], features[1])
    print(json.dumps({"n": args.n, "dim": args.dim, "threads": args.threads, "torch": torch.__version__,
                      "machine": platform.processor() or platform.machine(), "seconds": seconds}, indent=2))


if __name__ == "__main__":
    main()

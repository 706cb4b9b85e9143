"""Ingest + preprocessing speed on N built-in 2D chest phantoms, against an I/O floor measured in the same run.

    python benchmarks/ingest_phantom_2d.py --n 1000 --size 128 --workers 0

Stages: cold (generate + write phantoms, check, split, preprocess, cache), preprocess-only (phantom files
already on disk, cache emptied), warm (everything cached). The reference is the floor any ingest pays:
decoding the same image and mask PNGs with Pillow. Prints one JSON object with the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from radsynth.configs import load_config
from radsynth.pipelines.data.ingest import ingest


def timed(function):
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--target", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        config = load_config("demo", [
            f"data.phantom.n_cases={args.n}", f"data.phantom.size={args.size}",
            f"data.preprocess.target_shape=[{args.target},{args.target}]",
            f"runtime.output_dir={folder}", f"runtime.num_workers={args.workers}"])
        cold, result = timed(lambda: ingest(config, progress=False))
        shutil.rmtree(result.cache_dir)
        preprocess_only, _ = timed(lambda: ingest(config, progress=False))
        warm, again = timed(lambda: ingest(config, progress=False))
        assert again.preprocessed == 0
        paths = [p for record in result.records for p in (record.image, record.label) if p]
        decode, _ = timed(lambda: [np.asarray(Image.open(p)) for p in paths])

    report = {
        "cases": args.n, "phantom_size": args.size, "target": args.target, "workers": args.workers,
        "cold_s": round(cold, 2), "preprocess_only_s": round(preprocess_only, 2), "warm_s": round(warm, 2),
        "png_decode_floor_s": round(decode, 2),
        "cold_over_decode_floor": round(cold / decode, 1),
        "preprocess_only_over_decode_floor": round(preprocess_only / decode, 1),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
                    "torch": torch.__version__},
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()

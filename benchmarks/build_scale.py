"""How a build's generate and evaluate stages grow with the number of samples, on threads, Dask and Ray.

    python benchmarks/build_scale.py [--config configs/demo.yaml --model runs/demo/model]
                                     [--sizes 1000 10000] [--runners threads dask ray] [--workers 2] [key=value ...]

The model: ``--model`` (with the ``--config`` it was trained with, whose output folder holds its ingested data),
or, without one, a tiny demo-shaped model (phantoms at 32x32, a few training steps, 5 sampling steps) trained
first in a temporary folder, which measures the pipeline's own costs rather than a model's.
Before the measurements one evaluate fills the real-side scoring cache, so every measured evaluate scores its
samples against the cached real side (what a scheduled build does after its first run).
Each (runner, n) runs in a fresh process, as a build does: the generate flow (n samples in shards of
``sampling.shard_size``) and then the evaluate flow (its per-sample batches on the same runner), on that
process's ephemeral Prefect API. Per stage: seconds and peak memory, resident and summed over the process and
its children (the Dask or Ray workers), sampled every 0.2 s. References, from the same run: threads at the same
n (the runner ratio) and the smallest n (time and memory ~ n^k; k = 1 is linear).
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
from pathlib import Path

import psutil

TINY_MODEL = ["data.phantom.n_cases=120", "data.phantom.size=64", "data.preprocess.target_shape=[32,32]",
              "autoencoder.channels=[8,16,16]", "autoencoder.norm_num_groups=8", "autoencoder.max_steps=50",
              "autoencoder.batch_size=8", "diffusion.channels=[16,32,32]", "diffusion.norm_num_groups=8",
              "diffusion.num_head_channels=8", "diffusion.batch_size=8", "diffusion.max_steps=100",
              "diffusion.validate_every=1000", "conditioning.embed_dim=32", "sampling.num_inference_steps=5",
              "sampling.batch_size=32", "data.split.stratify_by=null", "scoring.self_supervised_steps=50",
              "scoring.segmenter_steps=20", "scoring.classifier_steps=20", "scoring.utility=false",
              "scoring.membership_samples=16", "scoring.membership_timesteps=2", "scoring.bootstrap_samples=50"]


class TreeMemory:
    """Peak resident memory of this process and all its children (workers included), sampled every 0.2 s."""

    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(0.2):
            total = 0
            for process in [me, *me.children(recursive=True)]:
                try:
                    total += process.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def one_run(config: str, model: str, runner: str, n: int, workers: int, overrides: list[str]) -> dict:
    """generate + evaluate of n samples on ``runner``, in this (fresh) process."""
    from radsynth.configs import load_config
    from radsynth.flows.settings import configure_prefect

    base = load_config(config, overrides)
    sample_dir = base.output_dir / "scale" / f"{runner}-{n}"
    configure_prefect(sample_dir.with_name(sample_dir.name + "-prefect"))
    from prefect import flow

    from radsynth.flows.stages import evaluate_flow, generate_flow
    from radsynth.flows.tasks import saved_model_hash

    flow(lambda: None, name="start-the-api")()  # the ephemeral API's start (20-30 s here) is not a stage's cost

    shard = max(32, math.ceil(n / 16))
    run = [*overrides, f"runtime.task_runner={runner}", f"runtime.workers={workers}", f"sampling.num_samples={n}",
           f"sampling.shard_size={shard}", f"scoring.sample_dir={sample_dir}"]
    model_hash = saved_model_hash(load_config(config, run), model)
    stages = {}
    for name, stage in (("generate", generate_flow), ("evaluate", evaluate_flow)):
        started = time.perf_counter()
        with TreeMemory() as memory:
            stage(config, run, model_dir=model, model_hash=model_hash)
        stages[name] = {"seconds": round(time.perf_counter() - started, 1), "peak_mb": round(memory.peak / 2**20)}
    return stages


def _child(config: str, model: str, runner: str, n: int, workers: int, overrides: list[str]) -> dict:
    command = [sys.executable, __file__, "--config", config, "--model", model, "--one", runner, str(n),
               "--workers", str(workers), *overrides]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{runner} n={n} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _tiny_model(folder: Path, overrides: list[str]) -> tuple[str, str]:
    from radsynth.configs import config_to_yaml, load_config
    from radsynth.pipelines.data.ingest import ingest
    from radsynth.pipelines.training import train

    config = load_config("demo", [*TINY_MODEL, f"runtime.output_dir={folder}", *overrides])
    path = folder / "tiny.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(config_to_yaml(config))
    ingest(config, progress=False)
    return str(path), str(train(config, progress=False).model_dir)


def _exponent(small: tuple[int, float], large: tuple[int, float]) -> float:
    return round(math.log(large[1] / small[1]) / math.log(large[0] / small[0]), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config")
    parser.add_argument("--model")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--runners", nargs="+", default=["threads", "dask", "ray"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--one", nargs=2, metavar=("RUNNER", "N"), help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(args.config, args.model, args.one[0], int(args.one[1]), args.workers,
                                 args.overrides)))
        return
    with tempfile.TemporaryDirectory() as scratch:
        config, model, overrides, trained = args.config, args.model, args.overrides, None
        if model is None:
            started = time.perf_counter()
            config, model = _tiny_model(Path(scratch) / "tiny", overrides)
            overrides, trained = [], round(time.perf_counter() - started, 1)  # the tiny model's config holds them
        # Fill the real-side scoring cache once, with a small set on threads (not measured).
        warm_up = _child(config, model, "threads", 64, args.workers, overrides)
        runs = {runner: {n: _child(config, model, runner, n, args.workers, overrides) for n in args.sizes}
                for runner in args.runners}
    sizes, smallest, largest = args.sizes, min(args.sizes), max(args.sizes)
    growth = {runner: {stage: {"time_exponent": _exponent((smallest, runs[runner][smallest][stage]["seconds"]),
                                                          (largest, runs[runner][largest][stage]["seconds"])),
                               "memory_exponent": _exponent((smallest, runs[runner][smallest][stage]["peak_mb"]),
                                                            (largest, runs[runner][largest][stage]["peak_mb"]))}
                       for stage in ("generate", "evaluate")}
              for runner in args.runners} if len(sizes) > 1 else {}
    versus_threads = {runner: {n: {stage: round(runs[runner][n][stage]["seconds"]
                                                / runs["threads"][n][stage]["seconds"], 2)
                                   for stage in ("generate", "evaluate")} for n in sizes}
                      for runner in args.runners if "threads" in runs and runner != "threads"}
    print(json.dumps({
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "memory_gb": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version()},
        "model": args.model or f"tiny demo-shaped model trained here in {trained} s",
        "workers": args.workers, "warm_up": warm_up, "runs": runs, "growth_smallest_to_largest": growth,
        "seconds_relative_to_threads": versus_threads}, indent=1))


if __name__ == "__main__":
    main()

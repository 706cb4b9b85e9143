"""Where sampling shards run (``runtime.task_runner``), and on which GPU.

threads: Prefect's thread pool in this process (default). dask: prefect-dask on a LocalCluster of worker
processes, or on an existing scheduler (``runtime.cluster_address``). ray: prefect-ray on a local Ray, or an
existing cluster (an address, or ``ray://host:10001``). Without ``runtime.workers`` there is one worker per GPU,
or one on a CPU-only machine (parallel shards on one CPU only fight over its cores).

Workers elsewhere report to this run's Prefect API (``reporting_here``) and must see the model and sample
folders at the same paths (``check_shared_folders``, the first thing every shard does).
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from prefect.task_runners import ThreadPoolTaskRunner

from radsynth.configs import RadsynthConfig, UserInputError


def worker_count(config: RadsynthConfig) -> int:
    return config.runtime.workers or max(torch.cuda.device_count(), 1)


def make_task_runner(config: RadsynthConfig):
    runtime, workers = config.runtime, worker_count(config)
    if runtime.task_runner == "threads":
        return ThreadPoolTaskRunner(max_workers=workers)
    if runtime.task_runner == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise UserInputError("runtime.task_runner", "dask needs prefect-dask, which is not installed",
                                 "pip install 'radsynth[dask]', or runtime.task_runner=threads") from None
        if runtime.cluster_address:
            return DaskTaskRunner(address=runtime.cluster_address)
        # Processes, one thread each: a shard owns its worker (and its GPU) while it samples.
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                              "dashboard_address": None})
    try:
        from prefect_ray import RayTaskRunner
    except ImportError:
        raise UserInputError("runtime.task_runner", "ray needs prefect-ray, which is not installed",
                             "pip install 'radsynth[ray]', or runtime.task_runner=threads") from None
    return RayTaskRunner(address=runtime.cluster_address) if runtime.cluster_address else RayTaskRunner(
        init_kwargs={"num_cpus": workers, "num_gpus": torch.cuda.device_count()})


def api_url() -> str:
    """The Prefect API this process talks to: PREFECT_API_URL, or the ephemeral server it started."""
    from prefect.client.orchestration import get_client

    return str(get_client(sync_client=True).api_url)


@contextmanager
def reporting_here(config: RadsynthConfig) -> Iterator[None]:
    """Shards submitted inside report to this run's API wherever they run. Dask and Ray workers take the
    submitting flow's settings with each task; without an explicit address, a worker of a run on the ephemeral
    API would start an ephemeral server of its own on the same SQLite file ("database is locked")."""
    if config.runtime.task_runner == "threads":
        yield
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url()}):
        yield


def check_shared_folders(model_dir: str | Path, sample_dir: str | Path) -> None:
    """This worker reads the model and writes samples where the run put them: a cluster's workers share the run's
    filesystem at the same paths. Refused in one line, naming the worker's host, before any work."""
    host, sample_dir = socket.gethostname(), Path(sample_dir)
    problem = None if (Path(model_dir) / "model_index.json").is_file() else f"the model at {model_dir} is not there"
    if problem is None:
        probe = sample_dir / f".shared-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            sample_dir.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            problem = f"{sample_dir} cannot be written ({error.strerror or error})"
    if problem:
        raise UserInputError("runtime.cluster_address", f"on the worker at {host}, {problem}",
                             "workers that share the run's filesystem at the same paths (runtime.output_dir on a "
                             "network filesystem)")


def shard_device(config: RadsynthConfig, shard: int) -> str:
    """An explicit ``runtime.device`` as given; with "auto" on GPUs, a Dask worker keeps to its own GPU
    (worker i -> GPU i) and threads take GPUs round-robin by shard."""
    if config.runtime.device != "auto":
        return config.runtime.device
    if not torch.cuda.is_available():
        return "cpu"
    slot = shard
    try:
        from distributed import get_worker

        slot = int(get_worker().name)  # LocalCluster names its workers 0..n-1
    except (ImportError, ValueError, TypeError):
        pass
    return f"cuda:{slot % torch.cuda.device_count()}"

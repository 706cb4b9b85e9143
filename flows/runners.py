"""Where sampling shards run (``runtime.task_runner``), and on which GPU.

threads: Prefect's thread pool in this process (default). dask: prefect-dask on a LocalCluster of worker
processes, or on an existing scheduler (``runtime.cluster_address``). ray: prefect-ray, likewise. Without
``runtime.workers`` there is one worker per GPU, or one on a CPU-only machine (parallel shards on one
CPU only fight over its cores).
"""

from __future__ import annotations

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
        # Processes, one thread each: a shard owns its worker (and its GPU) while it samples. The workers
        # report to this run's API: without its address each would start an ephemeral server of its own on
        # the same SQLite file ("database is locked").
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                              "dashboard_address": None, "env": {"PREFECT_API_URL": api_url()}})
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

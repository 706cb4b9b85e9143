"""The stage flows: train, generate, evaluate, release (and translate). ``build`` (build.py) runs them in order as subflows.

Each flow takes the config as a ``RadsynthConfig`` or as a YAML path / preset name plus ``key=value``
overrides (what a deployment stores), and returns a JSON-ready dict with the state of every task it ran:
"Completed" (ran now) or "Cached" (found from an earlier run with the same inputs).
"""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed
from prefect.logging import get_run_logger

from radsynth.configs import RadsynthConfig, apply_overrides, load_config
from radsynth.pipelines.scoring.evaluate import build_sample_dir
from radsynth.pipelines.training import sampling_model_dir, trained_model_dir
from radsynth.pipelines.translation import cycle_gan_dir

from .artifacts import artifact_key
from .caching import folder_sha256
from .results import save_result_storage
from .runners import make_task_runner, reporting_here
from .tasks import (
    data_sha256,
    distill_outputs_exist,
    distill_task,
    evaluate_outputs_exist,
    evaluate_task,
    generate_shard_task,
    ingest_task,
    release_task,
    saved_model_hash,
    shard_outputs_exist,
    train_outputs_exist,
    train_task,
    translate_outputs_exist,
    translate_task,
)

ConfigInput = RadsynthConfig | str


def resolve_config(config: ConfigInput, overrides: list[str] | None = None) -> RadsynthConfig:
    """The config a flow runs with; called first by every flow, which also registers the result store."""
    save_result_storage()
    if isinstance(config, RadsynthConfig):
        return apply_overrides(config, overrides) if overrides else config
    return load_config(config, overrides or [])


def _run(task, tasks: dict[str, str], name: str, *args, outputs_exist: bool = True, **kwargs):
    """Run ``task`` and note whether it ran now or came from the cache. Without its outputs on disk a cached
    result would point at nothing, so the task runs and its cache record is rewritten (``refresh_cache``)."""
    state = task.with_options(refresh_cache=not outputs_exist)(*args, return_state=True, **kwargs)
    result = state.result()  # raises the task's error, which fails this flow with it
    tasks[name] = state.name
    return result


@flow(name="train", log_prints=True)
def train_flow(config: ConfigInput, overrides: list[str] | None = None) -> dict:
    """Ingest (a no-op when the cache is current), then the autoencoder and the diffusion model."""
    config = resolve_config(config, overrides)
    tasks: dict[str, str] = {}
    ingested = _run(ingest_task, tasks, "ingest", config)
    trained = _run(train_task, tasks, "train", config, ingested["data_sha256"],
                   outputs_exist=train_outputs_exist(config))
    return {"tasks": tasks, "data_sha256": ingested["data_sha256"], "dataset_cases": ingested["dataset_cases"],
            **trained}


@flow(name="distill", log_prints=True)
def distill_flow(config: ConfigInput, overrides: list[str] | None = None, model_dir: str | None = None,
                 model_hash: str | None = None) -> dict:
    """The few-step student of the trained model (``sampling.student`` samples with it)."""
    config = resolve_config(config, overrides)
    model_dir = str(model_dir or trained_model_dir(config))
    tasks: dict[str, str] = {}
    distilled = _run(distill_task, tasks, "distill", config, model_dir, model_hash or saved_model_hash(config, model_dir),
                     data_sha256(config), outputs_exist=distill_outputs_exist(config))
    return {"tasks": tasks, **distilled}


@flow(name="generate", log_prints=True)
def generate_flow(config: ConfigInput, overrides: list[str] | None = None, model_dir: str | None = None,
                  model_hash: str | None = None) -> dict:
    """``sampling.num_samples`` samples in shards of ``sampling.shard_size``, fanned out over the task runner."""
    config = resolve_config(config, overrides)
    model_dir = str(model_dir or sampling_model_dir(config))
    model_hash = model_hash or saved_model_hash(config, model_dir)
    sample_dir = str(build_sample_dir(config))
    shards = sample_shards.with_options(task_runner=make_task_runner(config))
    with reporting_here(config):
        tasks, processes = shards(config, model_dir, model_hash, data_sha256(config), sample_dir)
    return {"tasks": tasks, "sample_dir": sample_dir, "model_dir": model_dir, "model_hash": model_hash,
            "task_runner": config.runtime.task_runner, "processes": processes}


@flow(name="sample-shards")
def sample_shards(config: RadsynthConfig, model_dir: str, model_hash: str, data_sha256: str,
                  sample_dir: str) -> tuple[dict[str, str], list[str]]:
    """Submit every shard and report each as it finishes (log + progress artifact); then fail on the first
    error, or return each shard's state and the processes (host:pid) that sampled."""
    n, size = config.sampling.num_samples, config.sampling.shard_size
    shards = [list(range(start, min(start + size, n))) for start in range(0, n, size)]
    futures = [generate_shard_task.with_options(refresh_cache=not shard_outputs_exist(sample_dir, indices)).submit(
        config, model_dir, model_hash, data_sha256, shard, indices, sample_dir) for shard, indices in enumerate(shards)]
    progress = create_progress_artifact(0.0, key=artifact_key(config.release.name or config.data.name, "sampling"),
                                        description=f"{len(shards)} shards of up to {size} samples")
    logger = get_run_logger()
    for done, _ in enumerate(as_completed(futures), start=1):
        update_progress_artifact(progress, 100.0 * done / len(futures))
        logger.info("%d of %d shards done", done, len(futures))
    results = [future.result() for future in futures]
    states = {f"generate-shard-{shard}": future.state.name for shard, future in enumerate(futures)}
    return states, sorted({result["process"] for result in results})


@flow(name="evaluate", log_prints=True)
def evaluate_flow(config: ConfigInput, overrides: list[str] | None = None, model_dir: str | None = None,
                  model_hash: str | None = None) -> dict:
    """The scorecard of the build's samples against its real splits."""
    config = resolve_config(config, overrides)
    model_dir = str(model_dir or sampling_model_dir(config))
    model_hash = model_hash or saved_model_hash(config, model_dir)
    tasks: dict[str, str] = {}
    scored = _run(evaluate_task, tasks, "evaluate", config, model_dir, model_hash, data_sha256(config),
                  folder_sha256(build_sample_dir(config)), outputs_exist=evaluate_outputs_exist(config))
    return {"tasks": tasks, **scored}


@flow(name="release", log_prints=True)
def release_flow(config: ConfigInput, overrides: list[str] | None = None, model_dir: str | None = None) -> dict:
    """Filter, gate and publish; a refused gate is a completed run whose result says so (``gate_passed``)."""
    config = resolve_config(config, overrides)
    tasks: dict[str, str] = {}
    released = _run(release_task, tasks, "release", config, str(model_dir or sampling_model_dir(config)))
    return {"tasks": tasks, **released}


@flow(name="translate", log_prints=True)
def translate_flow(config: ConfigInput, source_dir: str, source: str, target: str, overrides: list[str] | None = None,
                   model_dir: str | None = None, sample_dir: str | None = None) -> dict:
    """A folder of ``source`` images (and labels) as ``target`` images, each with its source's label map; cached on
    the folder's bytes, the model's and the translation settings."""
    config = resolve_config(config, overrides)
    model = model_dir or (trained_model_dir(config) if config.translation.method == "diffusion"
                          else cycle_gan_dir(config, source, target))
    tasks: dict[str, str] = {}
    translated = _run(translate_task, tasks, "translate", config, str(source_dir), source, target, data_sha256(config),
                      folder_sha256(source_dir), model_dir, folder_sha256(model), sample_dir,
                      outputs_exist=translate_outputs_exist(config, source, target, source_dir, sample_dir))
    return {"tasks": tasks, **translated}

"""The build's Prefect tasks: thin wrappers around the plain-Python stages, adding caching, retries and logs.

Cached (see ``caching``): train, each sampling shard, evaluate; each has an ``*_outputs_exist`` check with
which the flows refresh the cache when the files a cached result points at are gone. Not cached, because each is its own cache:
ingest (it hashes every source file and preprocesses only new or changed cases) and release (it fingerprints
the build and publishing the same build again is a no-op; the published folder, not a remembered path, is
the truth). A transient failure is retried with backoff (training resumes from its last checkpoint, a
shard skips the samples already written); a user error is not retried, and the failed state carries it.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect.tasks import exponential_backoff

from radsynth.configs import RadsynthConfig, UserInputError
from radsynth.pipelines.data.ingest import data_dir, ingest
from radsynth.pipelines.distillation import distill
from radsynth.pipelines.release import ReleaseRefused, release
from radsynth.pipelines.release.stage import headline_rows, release_root
from radsynth.pipelines.sampling.generate import generate, load_pipeline, sample_id
from radsynth.pipelines.sampling.pipeline import CONTROLNET_FOLDER, MASK_GENERATOR_FOLDER
from radsynth.pipelines.sampling.pipeline import model_hash as pipeline_hash
from radsynth.pipelines.scoring.evaluate import build_eval_dir, evaluate
from radsynth.pipelines.scoring.fan_out import BatchMap
from radsynth.pipelines.training import (
    AUTOENCODER_DIR,
    BOOKKEEPING_FIELDS,
    DIFFUSION_DIR,
    student_dir,
    train,
    train_dir,
    trained_model_dir,
)
from radsynth.pipelines.translation import expected_translations, translate, translation_sample_dir

from .artifacts import artifact_key, gate_markdown, report_link, scorecard_table
from .caching import file_sha256, stage_key
from .launch import launch_training
from .progress import TrainingProgress
from .results import RESULT_SERIALIZER, RESULT_STORAGE
from .runners import check_shared_folders, make_task_runner, reporting_here, shard_device


def _transient(task, task_run, state) -> bool:
    """Retry what may pass a second time (I/O, a lost worker, out of memory); never a user error."""
    try:
        state.result()
    except UserInputError:
        return False
    except BaseException:
        return True
    return False


RETRIES = {"retries": 2, "retry_delay_seconds": exponential_backoff(backoff_factor=10), "retry_condition_fn": _transient}
# Results as plain JSON in a store that reads nothing else back: no pickle from the run folder (``results``).
CACHED = {"persist_result": True, "result_serializer": RESULT_SERIALIZER, "result_storage": RESULT_STORAGE, **RETRIES}


# ------------------------------------------------------------------------------------------------ ingest


@task(name="ingest", **RETRIES)
def ingest_task(config: RadsynthConfig) -> dict:
    result = ingest(config, progress=False)
    get_run_logger().info("ingested %d cases (%d preprocessed in this run)", len(result.records), result.preprocessed)
    return {"data_sha256": file_sha256(result.manifest_path), "preprocessed_now": result.preprocessed, **result.summary}


def data_sha256(config: RadsynthConfig) -> str:
    """The ingested manifest's hash (case ids, source hashes, splits), for flows that start after ingest."""
    manifest = data_dir(config) / "manifest.jsonl"
    if not manifest.is_file():
        raise UserInputError(manifest, "no ingested dataset", "run the train or build flow (or `radsynth ingest`) first")
    return file_sha256(manifest)


# ------------------------------------------------------------------------------------------------- train

TRAIN_SECTIONS = ("data", "autoencoder", "diffusion", "conditioning", "controlnet", "mask_generator", "finetune",
                  "runtime.seed", "runtime.precision", "runtime.output_dir")


def saved_model_hash(config: RadsynthConfig, model_dir: str | Path) -> str:
    """The hash of what the generate stage loads from ``model_dir`` (with the mask models for pairs)."""
    cpu = config.model_copy(update={"runtime": config.runtime.model_copy(update={"device": "cpu"})})
    return pipeline_hash(load_pipeline(model_dir, cpu, progress=False))


def train_outputs_exist(config: RadsynthConfig) -> bool:
    return (trained_model_dir(config) / "model_index.json").is_file()


def _train_key(context, parameters) -> str:
    # Bookkeeping (how often to log or checkpoint) does not change the model; how long it trains does: a larger
    # max_steps must run the task (which then resumes from the last checkpoint) rather than return the old model.
    config = parameters["config"]
    return stage_key("train", config, TRAIN_SECTIONS, parameters["data_sha256"],
                     ignore=BOOKKEEPING_FIELDS - {"max_steps"})


@task(name="train", cache_key_fn=_train_key, **CACHED)
def train_task(config: RadsynthConfig, data_sha256: str) -> dict:
    logger = get_run_logger()
    if config.runtime.launch.distributed:
        launched = launch_training(config, logger)
        # The main rank's answer, in the shape of an in-process training's (a fine-tune answers "steps").
        digest = saved_model_hash(config, launched["model_dir"]) if config.sampling.pairs else launched["model_hash"]
        return {"model_dir": launched["model_dir"], "model_hash": digest,
                "steps": launched.get("diffusion_steps", launched.get("steps")), "processes": launched["processes"],
                "launched": launched["launched"]}
    if config.finetune.from_:
        from radsynth.pipelines.finetuning import finetune

        result = finetune(config, progress=False)
        # Pairs come from its ControlNet too: its weights must key the samples as the UNet's do.
        digest = saved_model_hash(config, result.model_dir) if config.sampling.pairs else result.model_hash
        return {"model_dir": str(result.model_dir), "model_hash": digest, "steps": result.steps}
    parts = {"autoencoder": (train_dir(config) / AUTOENCODER_DIR / "metrics.csv", config.autoencoder.max_steps),
             "diffusion": (train_dir(config) / DIFFUSION_DIR / "metrics.csv", config.diffusion.max_steps)}
    if config.conditioning.use_masks and config.conditioning.mask_input == "controlnet":
        parts["controlnet"] = (train_dir(config) / CONTROLNET_FOLDER / "metrics.csv", config.controlnet.max_steps)
    if config.mask_generator.enabled:
        parts["mask_generator"] = (train_dir(config) / MASK_GENERATOR_FOLDER / "metrics.csv",
                                   config.mask_generator.max_steps)
    with TrainingProgress(parts, logger, key=artifact_key(_slug(config), "training")):
        result = train(config, progress=False)
    # Pairs come from the mask models too: their weights must key the samples as the base's do.
    digest = saved_model_hash(config, result.model_dir) if config.sampling.pairs else result.model_hash
    logger.info("model %s (hash %s), %d diffusion steps%s", result.model_dir, digest[:12],
                result.diffusion_steps, f", resumed from step {result.resumed_from}" if result.resumed_from else "")
    return {"model_dir": str(result.model_dir), "model_hash": digest, "steps": result.diffusion_steps,
            "resumed_from": result.resumed_from, "autoencoder_holdout": result.autoencoder_holdout}


# ----------------------------------------------------------------------------------------------- distill


def distill_outputs_exist(config: RadsynthConfig) -> bool:
    return (student_dir(config) / "model_index.json").is_file()


DISTILL_SECTIONS = ("distill", "sampling.guidance_scale", "diffusion.max_grad_norm", "runtime.seed",
                    "runtime.precision", "runtime.output_dir")


def _distill_key(context, parameters) -> str:
    # As training's: a larger max_steps runs the task again, which resumes the student from its checkpoint.
    return stage_key("distill", parameters["config"], DISTILL_SECTIONS, parameters["model_hash"],
                     parameters["data_sha256"], ignore={"checkpoint_every"})


@task(name="distill", cache_key_fn=_distill_key, **CACHED)
def distill_task(config: RadsynthConfig, model_dir: str, model_hash: str, data_sha256: str) -> dict:
    result = distill(config, model_dir, progress=False)
    # The student's folder carries the base's mask models: pairs are keyed on them as the base's are.
    digest = saved_model_hash(config, result.model_dir) if config.sampling.pairs else result.model_hash
    get_run_logger().info("student %s (hash %s) of %s: %d distillation steps, guidance %g learnt", result.model_dir,
                          digest[:12], result.teacher_hash[:12], result.steps, result.guidance_scale)
    return {"model_dir": str(result.model_dir), "model_hash": digest, "teacher_hash": result.teacher_hash,
            "steps": result.steps}


# ---------------------------------------------------------------------------------------------- generate

# Fields that do not change any one sample: how many there are and how they are batched and sharded.
SAMPLING_COUNT_FIELDS = {"num_samples", "batch_size", "shard_size"}


def shard_outputs_exist(sample_dir: str | Path, indices: list[int]) -> bool:
    return all((Path(sample_dir) / f"{sample_id(i)}.json").is_file() for i in indices)


def _shard_key(context, parameters) -> str:
    return stage_key("generate", parameters["config"], ("sampling", "distill.steps", "runtime.seed"), parameters["model_hash"],
                     parameters["data_sha256"], list(parameters["indices"]), parameters["sample_dir"],
                     ignore=SAMPLING_COUNT_FIELDS)


@task(name="generate-shard", task_run_name="generate-shard-{shard}", cache_key_fn=_shard_key, **CACHED)
def generate_shard_task(config: RadsynthConfig, model_dir: str, model_hash: str, data_sha256: str, shard: int,
                        indices: list[int], sample_dir: str) -> dict:
    check_shared_folders(model_dir, sample_dir)
    device = shard_device(config, shard)
    shard_config = config.model_copy(update={"runtime": config.runtime.model_copy(update={"device": device})})
    result = generate(shard_config, model_dir, config.sampling.num_samples, sample_dir, progress=False, indices=indices)
    get_run_logger().info("shard %d on %s: %d samples written, %d already there; latent std %s", shard, device,
                          len(result.written), result.skipped, result.latent_std)
    return {"written": len(result.written), "skipped": result.skipped, "latent_std": result.latent_std,
            "device": device, "process": f"{socket.gethostname()}:{os.getpid()}"}


# ---------------------------------------------------------------------------------------------- evaluate

EVALUATE_SECTIONS = ("scoring", "conditioning.attributes", "runtime.seed", "runtime.output_dir")


def evaluate_outputs_exist(config: RadsynthConfig) -> bool:
    return (build_eval_dir(config) / "scorecard.json").is_file()


def _evaluate_key(context, parameters) -> str:
    config = parameters["config"]
    return stage_key("evaluate", config, EVALUATE_SECTIONS, parameters["data_sha256"], parameters["model_hash"],
                     parameters["samples_sha256"])


@task(name="score-batch", cache_policy=NO_CACHE, persist_result=False, **RETRIES)
def score_batch_task(work: Callable, batch: Any) -> Any:
    """One batch of the synthetic side's per-sample work (``scoring.fan_out``)."""
    return work(batch)


@contextmanager
def batches_on_task_runner(config: RadsynthConfig) -> Iterator[BatchMap]:
    """A map that runs each batch as a task on the build's task runner, as sampling shards run."""
    with reporting_here(config), make_task_runner(config) as runner:
        def map_batches(work: Callable, batches: Sequence[Any]) -> list:
            futures = [runner.submit(score_batch_task, {"work": work, "batch": batch}) for batch in batches]
            return [future.result() for future in futures]

        yield map_batches


@task(name="evaluate", cache_key_fn=_evaluate_key, **CACHED)
def evaluate_task(config: RadsynthConfig, model_dir: str, model_hash: str, data_sha256: str,
                  samples_sha256: str) -> dict:
    logger = get_run_logger()
    with batches_on_task_runner(config) as map_batches:
        result = evaluate(config, model_dir=model_dir, log=logger.info, map_batches=map_batches)
    scorecard = json.loads(Path(result.paths["json"]).read_text())
    scorecard_table(_slug(config), scorecard)
    for name, verdict in scorecard["verdicts"].items():
        logger.info("%s: %s%s", name, "PASS" if verdict["passed"] else "FAIL",
                    "".join(f"; {reason}" for reason in verdict.get("reasons", [])))
    headline = [{key: row.get(key) for key in ("metric", "feature_space", "stratum", "value", "ci_low", "ci_high",
                                               "reference_value")} for row in headline_rows(scorecard)
                if row["stratum"] == "all"]
    return {**{name: str(path) for name, path in result.paths.items()}, "verdicts": scorecard["verdicts"],
            "headline": headline, "seconds": result.seconds}


# --------------------------------------------------------------------------------------------- translate

TRANSLATE_SECTIONS = ("translation", "conditioning.attributes", "controlnet.conditioning_scale", "data.preprocess",
                      "runtime.seed", "runtime.output_dir")


def translate_outputs_exist(config: RadsynthConfig, source: str, target: str, source_dir: str | Path,
                            sample_dir: str | None) -> bool:
    """The folder holds this source folder's translations and no others (another run may have replaced them)."""
    folder = Path(sample_dir or translation_sample_dir(config, source, target))
    expected = expected_translations(source_dir)
    return bool(expected) and {path.stem for path in folder.glob("tr_*.json")} == expected


def _translate_key(context, parameters) -> str:
    config = parameters["config"]
    return stage_key("translate", config, TRANSLATE_SECTIONS, parameters["data_sha256"], parameters["source_sha256"],
                     parameters["model_sha256"], parameters["source"], parameters["target"],
                     parameters["sample_dir"] or "")


@task(name="translate", cache_key_fn=_translate_key, **CACHED)
def translate_task(config: RadsynthConfig, source_dir: str, source: str, target: str, data_sha256: str,
                   source_sha256: str, model_dir: str | None, model_sha256: str, sample_dir: str | None) -> dict:
    result = translate(config, source_dir, source, target, model_dir=model_dir, sample_dir=sample_dir, progress=False)
    get_run_logger().info("%d of %d %s cases translated to %s (%s) into %s", len(result.written), result.source_cases,
                          source, target, result.method, result.sample_dir)
    return {"sample_dir": str(result.sample_dir), "written": len(result.written), "source_cases": result.source_cases,
            "method": result.method, "model_hash": result.model_hash}


# ----------------------------------------------------------------------------------------------- release


@task(name="release", **RETRIES)
def release_task(config: RadsynthConfig, model_dir: str) -> dict:
    logger, name = get_run_logger(), _slug(config)
    try:
        result = release(config, model_dir=model_dir)
    except ReleaseRefused as refused:
        gate_markdown(name, refused.gate.to_markdown())
        failed = [f"{check.name} [{check.stratum}]: {check.reason}" for check in refused.gate.failed]
        logger.warning("release refused by the gate (%d checks failed); report %s", len(failed), refused.report)
        for reason in failed:
            logger.warning("  %s", reason)
        return {"gate_passed": False, "report": str(refused.report), "failed": failed,
                "release_root": str(release_root(config))}
    summary = result.summary()
    gate_markdown(name, result.gate.to_markdown())
    report_link(name, summary["report"])
    logger.info("%s %s: %d of %d samples, formats %s", "already released as" if summary["reused"] else "released",
                summary["release"], summary["n_released"], summary["n_scored"], ", ".join(summary["formats"]))
    return summary


def _slug(config: RadsynthConfig) -> str:
    return config.release.name or config.data.name

"""The ``build`` flow: one config, from the raw data to a released dataset (or a refusal with reasons).

train -> (distill, with sampling.student) -> generate -> evaluate -> release, each a subflow. Every cached
task is keyed on its config section and input hashes, so a rerun after a crash or a config change redoes only
what changed; the result lists each task as "Completed" (ran now) or "Cached".

Import this module only after ``radsynth.flows.settings.configure_prefect`` (the CLI and ``serve`` do), so
Prefect starts with the run folder's settings.
"""

from __future__ import annotations

from prefect import flow

from radsynth.pipelines.release.formats import check_formats_for_build

from .stages import (
    ConfigInput,
    distill_flow,
    evaluate_flow,
    generate_flow,
    release_flow,
    resolve_config,
    train_flow,
)


@flow(name="build", log_prints=True)
def build_flow(config: ConfigInput, overrides: list[str] | None = None) -> dict:
    config = resolve_config(config, overrides)
    # A release format the samples cannot fill is refused now, not after training and scoring.
    check_formats_for_build(config.release.formats, config.data.spatial_dims, config.sampling.pairs)
    trained = train_flow(config)
    stages = {"train": trained}
    model = {"model_dir": trained["model_dir"], "model_hash": trained["model_hash"]}
    if config.sampling.student:  # samples come from the student, so it is what is scored and released
        stages["distill"] = distill_flow(config, **model)
        model = {"model_dir": stages["distill"]["model_dir"], "model_hash": stages["distill"]["model_hash"]}
    generated = generate_flow(config, **model)
    scored = evaluate_flow(config, **model)
    released = release_flow(config, model_dir=model["model_dir"])
    stages.update(generate=generated, evaluate=scored, release=released)
    return {
        "command": "build",
        "stages": list(stages),
        "tasks": {name: state for stage in stages.values() for name, state in stage["tasks"].items()},
        "dataset_cases": trained["dataset_cases"],
        "model_dir": model["model_dir"], "model_hash": model["model_hash"],
        "sample_dir": generated["sample_dir"],
        "scorecard": scored["json"], "verdicts": scored["verdicts"], "headline": scored["headline"],
        "release": {key: value for key, value in released.items() if key != "tasks"},
        "gate_passed": released["gate_passed"],
    }

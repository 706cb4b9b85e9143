"""The ``build`` flow: from a config to a dataset. Today it ingests; later stages join it as tasks.

Import this module only after ``radsynth.flows.settings.configure_prefect`` (the CLI does), so Prefect
starts with the run folder's settings.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.logging import get_run_logger

from radsynth.configs import RadsynthConfig
from radsynth.pipelines.data.ingest import ingest
from radsynth.pipelines.data.summary import format_summary


@task(name="ingest")
def ingest_task(config: RadsynthConfig) -> dict:
    result = ingest(config, progress=False)
    get_run_logger().info("ingested %d cases (%d preprocessed in this run)", len(result.records), result.preprocessed)
    return {"preprocessed_now": result.preprocessed, **result.summary}


@flow(name="build", log_prints=True)
def build_flow(config: RadsynthConfig) -> dict:
    summary = ingest_task(config)
    print(format_summary(summary))
    return {"command": "build", "stages": ["ingest"], **summary}

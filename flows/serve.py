"""Scheduled builds: ``radsynth serve CONFIG --cron "0 2 * * 0"`` registers a deployment and runs its runs.

Schedules live on a Prefect server. The ephemeral API that ``radsynth build`` starts for itself exists only
while that one command runs, so ``serve`` asks for a real one: ``prefect server start`` (SQLite by default,
Postgres in production via PREFECT_API_DATABASE_CONNECTION_URL) and PREFECT_API_URL pointing at it.
"""

from __future__ import annotations

import os
from pathlib import Path

from radsynth.configs import UserInputError

NO_SERVER = ("no Prefect server: schedules live on one, and PREFECT_API_URL is not set",
             "start one with `prefect server start` and `export PREFECT_API_URL=http://127.0.0.1:4200/api`, "
             "or point PREFECT_API_URL at your team's server")


def serve_build(config_path: str, overrides: list[str], cron: str, name: str | None = None) -> None:
    """Register the ``build`` deployment with a cron schedule and run its flow runs until interrupted."""
    if not os.environ.get("PREFECT_API_URL"):
        raise UserInputError("PREFECT_API_URL", *NO_SERVER)
    from prefect import serve
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.deployments.runner import EntrypointType

    from .build import build_flow

    try:
        schedule = CronSchedule(cron=cron)
    except ValueError:
        raise UserInputError("--cron", f"'{cron}' is not a cron expression",
                             "five fields, e.g. '0 2 * * 0' (Sundays 02:00)") from None
    # The runs start in other processes, maybe other folders: give them an absolute path.
    parameters = {"config": _absolute(config_path), "overrides": list(overrides)}
    deployment = build_flow.to_deployment(name=name or Path(config_path).stem, schedule=schedule, parameters=parameters,
                                          entrypoint_type=EntrypointType.MODULE_PATH,
                                          description=f"radsynth build of {config_path} on '{cron}'")
    serve(deployment)


def _absolute(config_path: str) -> str:
    path = Path(config_path)
    return str(path.resolve()) if path.is_file() else config_path  # a preset name stays a name

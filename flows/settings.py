"""Prefect settings that must be in place before ``import prefect``.

Defaults only (``setdefault``): a user's PREFECT_API_URL, pointing at a real server, wins and runs unchanged.
Without it Prefect starts its embedded ephemeral API with SQLite under the run folder; its cold start takes
18-31 s on 2 cores, past Prefect's default 20 s timeout, hence the longer one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path


def configure_prefect(output_dir: str | Path) -> None:
    os.environ.setdefault("PREFECT_HOME", str(Path(output_dir).resolve() / ".prefect"))
    # Prefect creates only the last folder of its home; a fresh run folder has no parents yet.
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub look-ups at run time, ever


class UserErrorsInOneLine(logging.Filter):
    """Prefect logs a failed run's exception with its traceback; a user error (bad config, bad input file)
    is one line that names the file or key, and a traceback would bury it."""

    def filter(self, record: logging.LogRecord) -> bool:
        from radsynth.configs import UserInputError

        if record.exc_info and isinstance(record.exc_info[1], UserInputError):
            record.msg, record.args = record.getMessage().splitlines()[0], None
            record.exc_info = record.exc_text = None
        return True


def quiet_user_errors() -> None:
    """Call after ``import prefect``: run loggers then exist with Prefect's handlers."""
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logging.getLogger(name).addFilter(UserErrorsInOneLine())

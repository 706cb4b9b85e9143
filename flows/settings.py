"""Prefect settings that must be in place before ``import prefect``.

Defaults only (``setdefault``): a user's PREFECT_API_URL, pointing at a real server, wins and runs unchanged.
Without it Prefect starts its embedded ephemeral API with SQLite under the run folder; its cold start takes
18-31 s on 2 cores, past Prefect's default 20 s timeout, hence the longer one.
"""

from __future__ import annotations

import os
from pathlib import Path


def configure_prefect(output_dir: str | Path) -> None:
    os.environ.setdefault("PREFECT_HOME", str(Path(output_dir).resolve() / ".prefect"))
    # Prefect creates only the last folder of its home; a fresh run folder has no parents yet.
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub look-ups at run time, ever

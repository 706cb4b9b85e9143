"""Cache keys for the flows' tasks: the config a stage reads, plus hashes of the files it reads.

Prefect keeps each finished task's result under its key in the run folder's result storage
(``PREFECT_HOME/storage``), so a rerun in the same output folder, in a new process or after a crash, finds
every task that finished and redoes the rest. A key says nothing about whether the files a result points
at still exist: the flows check that and refresh the cache when they are gone (see ``stages._run``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from radsynth.configs import RadsynthConfig

try:
    from importlib.metadata import version as _version

    CODE_VERSION = _version("radsynth")
except Exception:  # pragma: no cover - a source checkout without metadata
    CODE_VERSION = "source"


def config_value(config: RadsynthConfig, dotted: str):
    """``config.sampling`` for "sampling", ``config.runtime.seed`` for "runtime.seed", as JSON-ready data."""
    value = config
    for name in dotted.split("."):
        value = getattr(value, name)
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


def stage_key(stage: str, config: RadsynthConfig, sections: Iterable[str], *inputs, ignore: Iterable[str] = ()) -> str:
    """sha256 of the stage name, the code version, the named config sections (less ``ignore``d fields) and inputs."""
    ignored = set(ignore)
    settings = {}
    for section in sections:
        value = config_value(config, section)
        settings[section] = {k: v for k, v in value.items() if k not in ignored} if isinstance(value, dict) else value
    payload = json.dumps({"stage": stage, "code": CODE_VERSION, "config": settings, "inputs": inputs},
                         sort_keys=True, default=str)
    return f"{stage}-{hashlib.sha256(payload.encode()).hexdigest()}"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_sha256(folder: str | Path) -> str:
    """sha256 over every file's relative name and bytes (hidden temporary files skipped); "" for no folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return ""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + bytes.fromhex(file_sha256(path)))
    return digest.hexdigest()

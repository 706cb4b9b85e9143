"""Where cached task results live, and how they are read back: plain JSON only, never a pickle.

Prefect persists a cached task's return value with the serializer its record names, and a record names its
own: the default pickle, or a "json" serializer whose JSON library and object decoder are import paths (a record
saying ``jsonlib: pickle`` unpickles). The records sit in the run folder, which anyone who can write ``runs/`` can
change, so a planted record would run code at the next build's cache lookup. radsynth's tasks return plain
dicts: they are written with plain JSON (no object encoder or decoder), and ``JsonResultStorage`` refuses to
hand Prefect any record whose serializer is not exactly that one; Prefect then counts the result as missing and
runs the task again, overwriting the record.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from prefect.filesystems import LocalFileSystem
from prefect.serializers import JSONSerializer
from prefect.settings import get_current_settings

from radsynth.configs import UserInputError

RESULT_SERIALIZER = JSONSerializer(object_encoder=None, object_decoder=None)
STORAGE_NAME = "run-folder"
# Tasks name their storage by reference: Prefect accepts a block saved on the API, which ``save_result_storage``
# does at the start of every flow (each build may have its own ephemeral API).
RESULT_STORAGE = f"radsynth-json-result-storage/{STORAGE_NAME}"
logger = logging.getLogger("radsynth.results")


class JsonResultStorage(LocalFileSystem):
    """Prefect's local result store (``results.local_storage_path``: the run folder's, see ``settings``) that
    reads back plain-JSON records only."""

    _block_type_name = "radsynth JSON result storage"
    _block_type_slug = "radsynth-json-result-storage"

    def _resolve_path(self, path: str) -> Path:
        # Where the current settings say (a build's run folder), looked up at every use: one process may run
        # builds of several run folders.
        return LocalFileSystem(basepath=str(get_current_settings().results.local_storage_path))._resolve_path(path)

    async def aread_path(self, path: str) -> bytes:
        return _checked(path, await super().aread_path(path))

    def read_path(self, path: str, _sync: bool | None = None) -> bytes:
        return _checked(path, super().read_path(path, _sync=True))


def _checked(path: str, content: bytes) -> bytes:
    try:
        serializer = json.loads(content)["metadata"]["serializer"]
    except (ValueError, KeyError, TypeError):
        serializer = "not a Prefect result record"
    if serializer != RESULT_SERIALIZER.model_dump(mode="json"):
        error = UserInputError(path, f"a cached task result written with serializer {serializer}",
                               "plain JSON results radsynth wrote; the task runs again and replaces it")
        logger.warning("refused %s", error)
        raise error
    return content


def save_result_storage() -> None:
    """Register the store on the current Prefect API, so that ``RESULT_STORAGE`` resolves."""
    JsonResultStorage().save(STORAGE_NAME, overwrite=True)

"""The preprocessed cache: one safetensors file per case under a folder keyed by the preprocessing config.

A case is reused when its file exists and records the same source sha256, so a rerun preprocesses only new
or changed cases, and a change of target shape, spacing or normalisation starts a fresh folder. New files
are written to a staging folder and moved in only after the whole ingest succeeded: a failed ingest leaves
the cache exactly as it was. safetensors keeps loading free of pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from radsynth.configs.schema import DataConfig

from .preprocess import IntensityMap, PreprocessedCase

CACHE_FORMAT_VERSION = 2


def cache_key(data: DataConfig) -> str:
    """Everything that changes a preprocessed array, and nothing else."""
    inputs = {
        "version": CACHE_FORMAT_VERSION,
        "preprocess": data.preprocess.model_dump(mode="json"),
        "label_names": data.label_names,
        "mask_threshold": data.mask_threshold,
    }
    if data.sources:  # one entry per source, so a single-source cache keeps its key
        inputs["sources"] = {source.name: [source.label_names, source.mask_threshold] for source in data.sources}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


class PreprocessedCache:
    def __init__(self, root: str | Path, key: str):
        self.folder = Path(root) / key
        self._staging: Path | None = None

    def path(self, case_id: str) -> Path:
        return self.folder / f"{case_id}.safetensors"

    def is_current(self, case_id: str, sha256: str) -> bool:
        path = self.path(case_id)
        if not path.is_file():
            return False
        try:
            with safe_open(str(path), framework="numpy") as handle:
                return (handle.metadata() or {}).get("sha256") == sha256
        except Exception:  # a corrupt cache file is simply rebuilt
            return False

    # ------------------------------------------------------------------------------------ writing
    def __enter__(self) -> PreprocessedCache:
        self._staging = self.folder / f".staging-{uuid.uuid4().hex[:8]}"
        self._staging.mkdir(parents=True)
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        staging, self._staging = self._staging, None
        if error_type is None:
            for staged in staging.iterdir():
                os.replace(staged, self.folder / staged.name)
        shutil.rmtree(staging, ignore_errors=True)

    def put(self, case_id: str, sha256: str, case: PreprocessedCase) -> None:
        if self._staging is None:
            raise RuntimeError("PreprocessedCache.put must run inside `with cache:`")
        tensors = {
            "image": np.ascontiguousarray(case.image, dtype=np.float32),
            "affine": case.affine.astype(np.float64),
            "original_affine": case.original_affine.astype(np.float64),
        }
        if case.label is not None:
            tensors["label"] = np.ascontiguousarray(case.label)
        metadata = {
            "case_id": case_id,
            "sha256": sha256,
            "intensity": json.dumps(vars(case.intensity)),
            "original_shape": json.dumps(list(case.original_shape)),
            "lost_labels": json.dumps(list(case.lost_labels)),
        }
        save_file(tensors, str(self._staging / f"{case_id}.safetensors"), metadata=metadata)

    # ------------------------------------------------------------------------------------ reading
    def get(self, case_id: str) -> PreprocessedCase:
        return read_cached_case(self.path(case_id))

    def metadata(self, case_id: str) -> dict[str, str]:
        """A case's metadata without reading its arrays."""
        with safe_open(str(self.path(case_id)), framework="numpy") as handle:
            return handle.metadata() or {}


def read_cached_case(path: str | Path) -> PreprocessedCase:
    tensors = load_file(str(path))
    with safe_open(str(path), framework="numpy") as handle:
        metadata = handle.metadata()
    return PreprocessedCase(
        image=tensors["image"],
        label=tensors.get("label"),
        affine=tensors["affine"],
        intensity=IntensityMap(**json.loads(metadata["intensity"])),
        original_shape=tuple(json.loads(metadata["original_shape"])),
        original_affine=tensors["original_affine"],
        lost_labels=tuple(json.loads(metadata.get("lost_labels", "[]"))),
    )

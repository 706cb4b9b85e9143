"""Real-side scoring work, done once: what reads only the real splits is kept beside the data and reused.

FID's ``reset_real_features=False`` for the whole scorecard. The self-supervised encoder, the real images'
features, the realism floors, the pixel and embedding copy detectors' calibration, the real-trained
classifiers and segmenters and the utility study's real-only arms depend on the real splits, the scoring
settings and the seed, not on the synthetic samples; the white-box probes (round-trip copies, membership
inference) depend on the generator too and carry its hash in their key. A second evaluate of fresh samples
then only embeds, compares and trains on the samples.

Each entry's key is a digest of everything it depends on: the real sets (image and mask bytes, ids, patients,
attributes, spacing), the scoring settings that can change real-side results, the seed, the scoring code
itself (a changed metric never reads an old entry) and the entry's own parameters. Entries are ``.npz`` arrays
(read with ``allow_pickle=False``), JSON and safetensors: nothing is unpickled from the folder, which a user can
write. Within one run the same entry is computed once even without a folder (the utility study's full-data
real arm is the same model as train-on-real's).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..data.io import _atomic, write_json
from .image_sets import ImageSet

# Settings that choose the synthetic set, not what is computed on the real one.
_SYNTHETIC_ONLY_SETTINGS = ("sample_dir", "max_samples", "synthetic_memory_mb", "batch_size")
_CODE = Path(__file__).parent


def _plain(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"a real-side record holds a {type(value).__name__}: only JSON values are kept")


def _digest(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def set_fingerprint(image_set: ImageSet) -> str:
    """sha256 of what scoring reads from a real set: image and mask bytes, ids, patients, attributes, spacing."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(image_set.images).tobytes())
    if image_set.masks is not None:
        digest.update(np.ascontiguousarray(image_set.masks).tobytes())
    digest.update(_digest([list(image_set.images.shape), image_set.ids, image_set.groups, image_set.conditions,
                           list(image_set.spacing)]).encode())
    return digest.hexdigest()


def code_fingerprint(folder: Path = _CODE) -> str:
    """sha256 of the scoring package's source: an entry computed by other code is a different entry."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.py")):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


class RealSideCache:
    """Entries computed once per key: in memory for the run, on disk under ``folder`` across runs (None: memory only).

    real_sets: the real splits scored against (train, holdout, test); settings: the scoring settings as a dict;
    model: the generator's hash, for entries that run it (``model=True`` in their key), else None.
    """

    def __init__(self, folder: str | Path | None, real_sets: Iterable[ImageSet | None], settings: dict, seed: int,
                 model: str | None = None) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.model = model
        relevant = {k: v for k, v in settings.items() if k not in _SYNTHETIC_ONLY_SETTINGS}
        self._base = _digest({"real": [None if s is None else set_fingerprint(s) for s in real_sets],
                              "settings": relevant, "seed": seed, "code": code_fingerprint()})
        self._memory: dict[str, object] = {}
        self.hits, self.misses = 0, 0

    def key(self, name: str, parts: dict, uses_model: bool = False) -> str:
        if uses_model and self.model is None:
            raise ValueError(f"cache entry {name} runs the generator but the cache was given no model hash")
        return f"{name}-{_digest({'base': self._base, 'parts': parts, 'model': self.model if uses_model else None})[:24]}"

    def arrays(self, name: str, compute: Callable[[], dict[str, np.ndarray]], uses_model: bool = False,
               **parts) -> dict[str, np.ndarray]:
        """Named arrays (no objects)."""
        def read(path: Path) -> dict[str, np.ndarray]:
            with np.load(path, allow_pickle=False) as stored:
                return {k: stored[k] for k in stored.files}

        def write(path: Path, value: dict[str, np.ndarray]) -> None:
            _atomic(path, lambda temporary: np.savez(temporary, **{k: np.asarray(v) for k, v in value.items()}))

        return self._entry(self.key(name, parts, uses_model) + ".npz",
                           lambda: {k: np.asarray(v) for k, v in compute().items()}, read, write)

    def record(self, name: str, compute: Callable[[], object], uses_model: bool = False, **parts) -> object:
        """A JSON value (floats round-trip exactly; NaN and infinity are kept)."""
        def write(path: Path, value: object) -> None:
            write_json(path, value)

        # Round-tripped on the first run too, so the first and every later run see the same types.
        return self._entry(self.key(name, parts, uses_model) + ".json",
                           lambda: json.loads(json.dumps(compute(), default=_plain)),
                           lambda path: json.loads(path.read_text()), write)

    def weights(self, name: str, modules: dict[str, torch.nn.Module], fit: Callable[[], object],
                uses_model: bool = False, **parts) -> bool:
        """Load ``modules``' trained weights, or ``fit()`` them (in place) and keep them. True when loaded."""
        def compute() -> dict[str, torch.Tensor]:
            fit()
            return {f"{prefix}.{k}": v.detach().cpu().clone().contiguous()
                    for prefix, module in modules.items() for k, v in module.state_dict().items()}

        def write(path: Path, tensors: dict[str, torch.Tensor]) -> None:
            _atomic(path, lambda temporary: save_file(tensors, str(temporary)))

        misses = self.misses
        tensors = self._entry(self.key(name, parts, uses_model) + ".safetensors", compute,
                              lambda path: load_file(str(path)), write)
        if self.misses > misses:
            return False
        for prefix, module in modules.items():
            module.load_state_dict({k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")})
        return True

    def _entry(self, file_name: str, compute: Callable[[], object], read: Callable[[Path], object],
               write: Callable[[Path, object], None]) -> object:
        if file_name in self._memory:
            self.hits += 1
            return self._memory[file_name]
        path = self.folder / file_name if self.folder is not None else None
        if path is not None and path.is_file():
            value = read(path)
            self.hits += 1
        else:
            value = compute()
            self.misses += 1
            if path is not None:
                write(path, value)
        self._memory[file_name] = value
        return value


def rows_digest(rows: np.ndarray) -> str:
    """A short key part for a subset of rows (the utility study's patient subsamples)."""
    return hashlib.sha256(np.ascontiguousarray(rows, dtype=np.int64).tobytes()).hexdigest()[:16]

"""The sample sidecar as a typed contract, and the digests that bind a score to the bytes it scored.

``write_sample`` writes it, scoring and release read it, through ``read_sidecar`` only: a sidecar that is not
JSON, misses a provenance field, or names a file other than its own sample's (``<id>.png`` / ``<id>.nii.gz``
and ``<id>_label.*`` beside it) is one line and exit 2, so no reader ever follows a path out of the sample
folder. ``sample_digest`` is what scoring records per sample and what the release recomputes before anything
is published: a sample whose image, label map or sidecar changed after scoring is not the sample that was
scored.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from radsynth.configs.errors import UserInputError

IMAGE_EXTENSIONS = (".png", ".nii.gz")


class Sidecar(BaseModel):
    """``<id>.json``: what one sample is and how it was made. Other fields (mask provenance, lesion edits,
    label names, inpainting) are kept as written."""

    model_config = ConfigDict(extra="allow", frozen=True)

    file: str
    label_file: str | None = None
    is_synthetic: Literal[True]
    format: Literal["nifti", "png16"]
    prompt: str
    conditions: dict[str, str] = {}  # the attribute values the prompt states, as data
    seed: int
    scheduler: str
    num_inference_steps: int
    guidance_scale: float
    model_hash: str
    derived_from_real: bool = False
    shape: list[int]
    spacing: list[float]
    png_low: float | None = None
    png_high: float | None = None


def sample_files(sample_id: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The only names a sample's image and label map may have."""
    return (tuple(f"{sample_id}{ext}" for ext in IMAGE_EXTENSIONS),
            tuple(f"{sample_id}_label{ext}" for ext in IMAGE_EXTENSIONS))


def read_sidecar(path: str | Path) -> Sidecar:
    """The sidecar at ``path``, validated and confined to its own sample's files; UserInputError otherwise."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserInputError(path, f"sidecar is not readable JSON ({error})",
                             "the <id>.json radsynth generate writes") from None
    if not isinstance(raw, dict):
        raise UserInputError(path, f"sidecar is a JSON {type(raw).__name__}", "a JSON object")
    try:
        sidecar = Sidecar.model_validate(raw)
    except ValidationError as error:
        problem = error.errors()[0]
        where = ".".join(str(part) for part in problem["loc"]) or "sidecar"
        raise UserInputError(path, f"field '{where}': {problem['msg']}",
                             "a sidecar written by radsynth generate") from None
    images, labels = sample_files(path.stem)
    if sidecar.file not in images:
        raise UserInputError(path, f"names the image '{sidecar.file}'", f"its own sample's: {' or '.join(images)}")
    if sidecar.label_file is not None and sidecar.label_file not in labels:
        raise UserInputError(path, f"names the label map '{sidecar.label_file}'",
                             f"its own sample's: {' or '.join(labels)}")
    return sidecar


@dataclass(frozen=True)
class SampleDigest:
    """sha256 of a sample's image, label map ("" without one) and sidecar, as written."""

    image_sha256: str
    label_sha256: str
    sidecar_sha256: str

    @classmethod
    def of(cls, folder: str | Path, sample_id: str, sidecar: Sidecar) -> SampleDigest:
        folder = Path(folder)
        label = _file_sha256(folder / sidecar.label_file) if sidecar.label_file else ""
        return cls(_file_sha256(folder / sidecar.file), label, _file_sha256(folder / f"{sample_id}.json"))

    @classmethod
    def from_row(cls, row: dict) -> SampleDigest | None:
        """The digests a per-sample row recorded; None when it recorded none (scored before they were)."""
        if not row.get("image_sha256"):
            return None
        return cls(str(row["image_sha256"]), str(row.get("label_sha256") or ""), str(row.get("sidecar_sha256") or ""))

    def differences(self, scored: SampleDigest) -> list[str]:
        """What changed since ``scored`` was recorded: "image", "label map", "sidecar"."""
        names = {"image_sha256": "image", "label_sha256": "label map", "sidecar_sha256": "sidecar"}
        return [name for key, name in names.items() if getattr(self, key) != getattr(scored, key)]


def samples_digest(digests: dict[str, SampleDigest]) -> str:
    """One digest over a scored folder: every sample id with its three file digests, in id order."""
    digest = hashlib.sha256()
    for sample_id in sorted(digests):
        entry = digests[sample_id]
        digest.update(f"{sample_id}|{entry.image_sha256}|{entry.label_sha256}|{entry.sidecar_sha256}\n".encode())
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

"""The conversion cache: a small JSON sidecar next to each converted case records the digest of its source
files, so an unchanged series is not converted twice. It holds file names and label names, no identifiers."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

SIDECAR_VERSION = 1  # bump when the conversion changes, so cached conversions are redone


@dataclass
class Converted:
    image: Path
    label: Path | None
    label_names: dict[int, str]


def _sidecar_path(out_dir: Path, case_id: str) -> Path:
    return out_dir / f"{case_id}.json"


def reuse(out_dir: Path, case_id: str, sha256: str) -> Converted | None:
    """The earlier conversion of the same source bytes (and the same converter version), if complete."""
    try:
        sidecar = json.loads(_sidecar_path(out_dir, case_id).read_text())
    except (OSError, ValueError):
        return None
    if sidecar.get("version") != SIDECAR_VERSION or sidecar.get("source_sha256") != sha256:
        return None
    image = out_dir / sidecar["image"]
    label = out_dir / sidecar["label"] if sidecar.get("label") else None
    if not image.is_file() or (label is not None and not label.is_file()):
        return None
    return Converted(image, label, {int(k): v for k, v in sidecar["label_names"].items()})


def write_sidecar(out_dir: Path, case_id: str, sha256: str, converted: Converted) -> None:
    sidecar = {
        "version": SIDECAR_VERSION,
        "source_sha256": sha256,
        "image": converted.image.name,
        "label": converted.label.name if converted.label else None,
        "label_names": {str(k): v for k, v in converted.label_names.items()},
    }
    path = _sidecar_path(out_dir, case_id)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(sidecar, indent=1))
    os.replace(temporary, path)  # written last: a sidecar vouches only for finished conversions



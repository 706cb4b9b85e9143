"""What a release is made of: samples read back from a sample folder (image, optional label map, sidecar).

Every format writer takes ``ReleaseSample`` objects and a ``DatasetInfo``; none of them reads configs or
scorecards. Images come back in physical units (16-bit PNGs through the mapping in their sidecar), label
maps as integers on the image's grid, both with the sample's affine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from radsynth.configs.errors import UserInputError
from radsynth.generators.prompts import parse_prompt
from radsynth.pipelines.data.io import Image, read_image, scaling_affine
from radsynth.pipelines.sampling.sidecar import SampleDigest, Sidecar, read_sidecar
from radsynth.pipelines.sampling.writers import png16_to_physical


@dataclass(frozen=True)
class DatasetInfo:
    """What every format needs to know about the dataset as a whole."""

    name: str
    modality: str  # ct | mri | xray
    spatial_dims: int
    label_names: Mapping[int, str] = field(default_factory=dict)  # 0 = background; empty when there are no masks
    attributes: Sequence[str] = ()  # prompt attributes that become table columns
    class_attribute: str | None = None  # the attribute whose values name the classification folders
    description: str = ""
    license: str = "other (see the dataset card)"  # the release stage sets it (``release_license``)


@dataclass(frozen=True)
class ReleaseSample:
    """One sample of a sample folder: ``<id>.png|.nii.gz``, optional ``<id>_label.*`` and ``<id>.json``."""

    sample_id: str
    image_path: Path
    sidecar: Mapping[str, object]
    label_path: Path | None = None

    @property
    def sidecar_path(self) -> Path:
        return self.image_path.parent / f"{self.sample_id}.json"

    @property
    def is_synthetic(self) -> bool:
        return bool(self.sidecar.get("is_synthetic", False))

    @property
    def derived_from_real(self) -> bool:
        """Mask-bank and inpainted samples carry real anatomy: they may only go to internal destinations."""
        return bool(self.sidecar.get("derived_from_real", False))

    @property
    def prompt(self) -> str:
        return str(self.sidecar.get("prompt", ""))

    @cached_property
    def conditions(self) -> dict[str, str]:
        """The prompted attributes as the sidecar records them ({finding: effusion, view: PA}); a sidecar from
        before they were recorded states them in its prompt's header."""
        return dict(self.sidecar.get("conditions") or {}) or parse_prompt(self.prompt)

    def digest(self) -> SampleDigest:
        """The sha256 of the sample's image, label map and sidecar as they are now."""
        return SampleDigest.of(self.image_path.parent, self.sample_id, Sidecar.model_validate(self.sidecar))

    def read_image(self) -> Image:
        """The image in physical units (HU for CT) with its voxel-to-world affine."""
        image = read_image(self.image_path)
        if self.image_path.suffix == ".png":
            low, high = float(self.sidecar["png_low"]), float(self.sidecar["png_high"])
            return Image(png16_to_physical(image.array, low, high), self._png_affine())
        return Image(np.asarray(image.array, dtype=np.float32), image.affine)

    def read_label(self) -> Image | None:
        if self.label_path is None:
            return None
        label = read_image(self.label_path)
        affine = self._png_affine() if self.label_path.suffix == ".png" else label.affine
        return Image(np.asarray(label.array).astype(np.int64), affine)

    def _png_affine(self) -> np.ndarray:
        return scaling_affine(self.sidecar.get("spacing", (1.0, 1.0)))


def read_sample_folder(folder: str | Path) -> list[ReleaseSample]:
    """Every sample of a folder written by ``write_sample``, in id order; a sample without its files is an error.

    Sidecars are read through their contract (``read_sidecar``): one that names a file outside its own sample is
    refused. Hidden files (a writer's temporaries) are skipped.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserInputError(folder, "sample folder not found", "run `radsynth generate` first")
    samples = []
    for sidecar_path in sorted(p for p in folder.glob("*.json") if not p.name.startswith(".")):
        sidecar = read_sidecar(sidecar_path)
        image_path = folder / sidecar.file
        label_path = folder / sidecar.label_file if sidecar.label_file else None
        for path in (image_path, label_path):
            if path is not None and not path.is_file():
                raise UserInputError(sidecar_path, f"names '{path.name}', which is missing", "regenerate the sample")
        samples.append(ReleaseSample(sidecar_path.stem, image_path, sidecar.model_dump(), label_path))
    if not samples:
        raise UserInputError(folder, "no samples (no <id>.json sidecars)", "run `radsynth generate` first")
    return samples

"""Classification layout: ``<class value>/<id><ending>`` per value of ``info.class_attribute`` and a
``metadata.csv`` (file_name, label, sample_id, is_synthetic, derived_from_real, prompt, attributes) as the
Hugging Face ``imagefolder`` loader and torchvision's ``ImageFolder`` expect it. ``label`` is the class's index
in ``class_names`` (torchvision's order too: sorted), which the dataset card declares as a ``ClassLabel``; the
value itself is in the attribute's own column."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from radsynth.pipelines.release.samples import DatasetInfo, ReleaseSample

from .pairs import image_ending, write_pair
from .tables import sample_row, write_csv

_UNSAFE_IN_FOLDER_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def class_folder(value: str) -> str:
    """A folder name for a class value ("pleural effusion" -> "pleural_effusion"); the CSV keeps the value."""
    return _UNSAFE_IN_FOLDER_NAME.sub("_", value.strip()).strip("._") or "_"


def class_names(values: Iterable[str]) -> list[str]:
    """The classes in label order: sorted by folder name, as torchvision's ``ImageFolder`` numbers them."""
    return sorted(set(values), key=class_folder)


def write_imagefolder(samples: Sequence[ReleaseSample], out_dir: Path, info: DatasetInfo) -> list[Path]:
    ending = image_ending(info)
    values = [sample.conditions[str(info.class_attribute)] for sample in samples]
    names = class_names(values)
    paths, rows = [], []
    for sample, value in zip(samples, values):
        file_name = f"{class_folder(value)}/{sample.sample_id}{ending}"
        pair = write_pair(sample, out_dir / file_name)
        paths += pair.paths
        rows.append(sample_row(sample, info, pair, file_name=file_name, label=names.index(value)))
    paths.append(write_csv(out_dir / "metadata.csv", rows))
    return paths

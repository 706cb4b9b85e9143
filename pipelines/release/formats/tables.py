"""The per-sample fields that every table of a release carries (CSV rows, datalist entries).

``is_synthetic`` and ``derived_from_real`` are in every row, so a file that leaves the release folder still
says what it is; the prompt and one column per prompted attribute make the tables filterable by condition.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path

from radsynth.pipelines.data.io import write_text
from radsynth.pipelines.release.samples import DatasetInfo, ReleaseSample
from radsynth.pipelines.sampling.writers import PNG_MAPPING

from .pairs import WrittenPair


def sample_row(sample: ReleaseSample, info: DatasetInfo, pair: WrittenPair | None = None, **columns: object) -> dict[str, object]:
    """``columns`` (the format's own: file names, class) then marking, prompt, attributes and, for a 16-bit PNG
    image, its mapping to physical units and its pixel spacing ("row column", mm), which PNG cannot hold.
    An attribute named like another column is refused, not overwritten."""
    fields: dict[str, object] = {
        "sample_id": sample.sample_id,
        "is_synthetic": sample.is_synthetic,
        "derived_from_real": sample.derived_from_real,
        "prompt": sample.prompt,
    }
    if pair is not None and pair.png_range is not None:
        fields.update(png_low=pair.png_range[0], png_high=pair.png_range[1], png_mapping=PNG_MAPPING,
                      pixel_spacing_mm=" ".join(f"{step:g}" for step in pair.png_spacing or ()))
    clashing = sorted((set(columns) | set(fields)) & set(info.attributes))
    if clashing:
        raise ValueError(f"prompt attributes {clashing} clash with table columns of the same name")
    return {**columns, **fields, **{attribute: sample.conditions.get(attribute, "") for attribute in info.attributes}}


def write_csv(path: Path, rows: Sequence[Mapping[str, object]]) -> Path:
    """One CSV with the union of the rows' columns in first-seen order; a missing value is an empty cell."""
    columns = list(dict.fromkeys(column for row in rows for column in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, buffer.getvalue())

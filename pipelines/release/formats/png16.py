"""16-bit PNG for 2D X-ray: ``images/<id>.png`` (16-bit), ``masks/<id>.png`` (integer labels, 8-bit or 16-bit
above 255), ``metadata.csv`` with marking, attributes and each image's mapping to physical units
(``png_low``, ``png_high``), and ``labels.json`` naming the mask values."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from radsynth.pipelines.data.io import write_json
from radsynth.pipelines.release.samples import DatasetInfo, ReleaseSample

from .pairs import PNG_ENDING, write_pair
from .tables import sample_row, write_csv


def write_png16(samples: Sequence[ReleaseSample], out_dir: Path, info: DatasetInfo) -> list[Path]:
    paths, rows = [], []
    for sample in samples:
        file_name = f"{sample.sample_id}{PNG_ENDING}"
        mask_path = out_dir / "masks" / file_name if sample.label_path is not None else None
        pair = write_pair(sample, out_dir / "images" / file_name, mask_path)
        paths += pair.paths
        masks = {"mask_file_name": f"masks/{file_name}"} if mask_path else {}
        rows.append(sample_row(sample, info, pair, file_name=f"images/{file_name}", **masks))
    paths.append(write_csv(out_dir / "metadata.csv", rows))
    if info.label_names:
        names = {0: "background", **info.label_names}
        paths.append(write_json(out_dir / "labels.json", {str(value): names[value] for value in sorted(names)}))
    return paths

"""MONAI datalist: ``datalist.json`` with ``training`` entries (image, label, marking, prompt attributes), paths
relative to the datalist's folder, which ``monai.data.load_decathlon_datalist`` resolves.

Images go to ``images/``, labels to ``labels/``: NIfTI in physical units, or for 2D X-ray the 16-bit PNG with
its ``png_low``/``png_high`` in the entry (MONAI's PIL reader returns the raw 16-bit values).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from radsynth.pipelines.data.io import write_json
from radsynth.pipelines.release.samples import DatasetInfo, ReleaseSample

from .pairs import image_ending, write_pair
from .tables import sample_row


def write_monai(samples: Sequence[ReleaseSample], out_dir: Path, info: DatasetInfo) -> list[Path]:
    ending = image_ending(info)
    paths, training = [], []
    for sample in samples:
        file_name = f"{sample.sample_id}{ending}"
        label_path = out_dir / "labels" / file_name if sample.label_path is not None else None
        pair = write_pair(sample, out_dir / "images" / file_name, label_path)
        paths += pair.paths
        files = {"image": f"images/{file_name}", **({"label": f"labels/{file_name}"} if label_path else {})}
        training.append(sample_row(sample, info, pair, **files))
    datalist = {"name": info.name, "description": info.description, "licence": info.license, "training": training}
    paths.append(write_json(out_dir / "datalist.json", datalist))
    return paths

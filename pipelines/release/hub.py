"""The release as the Hugging Face ``datasets`` library loads it.

``load_dataset(release_dir)`` on a folder of several formats would read every PNG it finds: the ``imagefolder``
and ``png16`` copies of each sample mixed into one split, ``label`` a plain string. The dataset card therefore
declares one ``configs:`` entry per PNG table format, each reading only its own folder, with its columns typed:
images (``file_name``, ``*_file_name``) as ``Image``, the image folder's ``label`` as a ``ClassLabel``, the
marking as booleans. The default is the table with label maps when the release has them (paired annotations are
what radsynth is for), else the image folder. NIfTI and DICOM formats are read with MONAI, nnU-Net or pydicom.
"""

from __future__ import annotations

import csv
from pathlib import Path

from .formats.imagefolder import class_names

__all__ = ["HUB_FORMATS", "hub_configs"]

HUB_FORMATS = ("png16", "imagefolder")  # the formats whose metadata.csv the `imagefolder` builder reads
TYPED_COLUMNS = {"is_synthetic": "bool", "derived_from_real": "bool", "png_low": "float64", "png_high": "float64"}
FILE_COLUMN_SUFFIX = "_file_name"


def hub_configs(folder: Path, class_attribute: str | None) -> list[dict]:
    """The ``configs`` entries of the card's front matter for the formats present in ``folder``."""
    configs = []
    for name in HUB_FORMATS:
        table = Path(folder) / name / "metadata.csv"
        if not table.is_file():
            continue
        with table.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        if not rows:
            continue
        labelled = "label" in rows[0] and class_attribute in rows[0]
        classes = class_names(row[class_attribute] for row in rows) if labelled else None
        configs.append({"config_name": name, "data_files": [{"split": "train", "path": f"{name}/**"}],
                        "features": [_feature(column, classes) for column in rows[0]]})
    with_label_maps = [config for config in configs if _has_label_maps(config)]
    classification = [config for config in configs if config["config_name"] == "imagefolder"]
    default = (with_label_maps or classification or configs or [None])[0]
    if default is not None:
        default["default"] = True
        configs.sort(key=lambda config: config is not default)
    return configs


def _feature(column: str, classes: list[str] | None) -> dict:
    if column == "file_name":
        return {"name": "image", "dtype": "image"}
    if column.endswith(FILE_COLUMN_SUFFIX):  # the loader names the column without the suffix
        return {"name": column[: -len(FILE_COLUMN_SUFFIX)], "dtype": "image"}
    if column == "label" and classes is not None:
        return {"name": "label", "dtype": {"class_label": {"names": {str(i): name for i, name in enumerate(classes)}}}}
    return {"name": column, "dtype": TYPED_COLUMNS.get(column, "string")}


def _has_label_maps(config: dict) -> bool:
    return sum(feature["dtype"] == "image" for feature in config["features"]) > 1

"""2D image folders: PNG (8/16-bit) or JPEG files listed in a CSV, with an optional mask folder.

The CSV gives one row per image: an id (the file stem), a patient id, optional report text and attribute
columns. Masks share the image's stem; 8-bit 0/255 masks are binarised at ``mask_threshold`` when read.
"""

from __future__ import annotations

import csv
from pathlib import Path

from PIL import Image as PILImage

from radsynth.configs.errors import UserInputError
from radsynth.configs.schema import MODALITIES, DataSource

from ..io import RASTER_SUFFIXES
from ..manifest import AttributeValue, CaseRecord, checked_case_id, file_sha256

SPLIT_ALIASES = {"train": "train", "holdout": "holdout", "val": "holdout", "validation": "holdout", "test": "test"}


def read_image_folder(data: DataSource, work_dir: Path) -> list[CaseRecord]:
    source = data.image_folder
    root = Path(data.root)
    csv_path = root / source.csv
    rows = _read_rows(csv_path, _required_columns(data))
    images = _index_files(root / source.images_dir)
    masks = _index_files(root / source.masks_dir) if source.masks_dir and (root / source.masks_dir).is_dir() else {}
    label_names = data.label_names or {0: "background", 1: "foreground"}

    records = []
    for line, row in enumerate(rows, start=2):
        where = f"{csv_path}:{line}"
        case_id = checked_case_id(row[source.id_column].strip(), where, source.id_column)
        if case_id not in images:
            raise UserInputError(where, f"no image for id '{case_id}' in {root / source.images_dir}",
                                 f"a file named {case_id} with suffix {', '.join(RASTER_SUFFIXES)}")
        patient = row[source.patient_column].strip()
        if not patient:
            raise UserInputError(where, f"empty {source.patient_column} for id '{case_id}'",
                                 "every image needs a patient id")
        image_path, mask_path = images[case_id], masks.get(case_id)
        attributes = {column: _parse(row[column]) for column in source.attribute_columns}
        text = row[source.text_column].strip() if source.text_column else ""
        modality = _modality(row, data, where)
        region = (row[source.body_region_column].strip() if source.body_region_column else "") \
            or data.body_region or "unknown"
        records.append(
            CaseRecord(
                case_id=case_id,
                patient_id=patient,
                modality=modality,
                body_region=region,
                image=str(image_path),
                label=str(mask_path) if mask_path else None,
                label_names=label_names,
                spacing=source.pixel_spacing_mm,
                shape=_raster_shape(image_path),
                text=text or caption_from_attributes(modality, region, attributes),
                attributes=attributes,
                split=_split(row, source.split_column, where),
                source=data.name,
                license=str(row.get("license") or data.license),
                sha256=file_sha256(image_path, mask_path),
            )
        )
    return records


def caption_from_attributes(modality: str, region: str, attributes: dict[str, AttributeValue]) -> str:
    """A plain prompt when the source has no report: 'xray of the chest; view PA; sex M; finding COVID-19'."""
    parts = [f"{modality} of the {region.replace('_', ' ')}"]
    parts += [f"{key} {value}" for key, value in attributes.items() if value not in (None, "")]
    return "; ".join(parts)


def _required_columns(data: DataSource) -> list[str]:
    source = data.image_folder
    columns = [source.id_column, source.patient_column, *source.attribute_columns]
    columns += [column for column in (source.text_column, source.split_column, source.modality_column,
                                      source.body_region_column) if column]
    return columns


def _read_rows(path: Path, required: list[str]) -> list[dict[str, str]]:
    if not path.is_file():
        raise UserInputError(path, "CSV not found", "set data.image_folder.csv (relative to data.root)")
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            header = reader.fieldnames or []
    except (UnicodeDecodeError, csv.Error) as error:
        raise UserInputError(path, f"unreadable CSV ({error})", "a UTF-8 CSV with a header row") from None
    missing = [column for column in required if column not in header]
    if missing:
        raise UserInputError(path, f"missing CSV columns {missing}", f"columns present: {', '.join(header)}")
    if not rows:
        raise UserInputError(path, "CSV has no rows", "one row per image")
    for line, row in enumerate(rows, start=2):
        # csv gives a short row's missing cells as None and a long row's extra cells under the key None.
        cells = len(header) - sum(value is None for key, value in row.items() if key is not None)
        cells += len(row.get(None) or [])
        if cells != len(header):
            raise UserInputError(f"{path}:{line}", f"row has {cells} cells, the header {len(header)}",
                                 "one cell per column (quote a cell that holds a comma)")
    return rows


def _index_files(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise UserInputError(folder, "folder not found", "set data.image_folder.images_dir (relative to data.root)")
    return {path.stem: path for path in sorted(folder.iterdir())
            if path.suffix.lower() in RASTER_SUFFIXES and not path.name.startswith(".")}


def _raster_shape(path: Path) -> tuple[int, int]:
    try:
        with PILImage.open(path) as handle:  # reads the header only
            width, height = handle.size
    except PILImage.DecompressionBombError as error:  # a header claiming billions of pixels
        raise UserInputError(path, f"image too large to decode ({error})",
                             f"images up to {PILImage.MAX_IMAGE_PIXELS} pixels") from None
    except OSError as error:
        raise UserInputError(path, f"unreadable image ({error})") from None
    return height, width


def _parse(text: str | None) -> AttributeValue:
    text = (text or "").strip()
    if not text:
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _modality(row: dict[str, str], data: DataSource, where: str) -> str:
    column = data.image_folder.modality_column
    value = row[column].strip().lower() if column else ""
    if not value:
        if data.modality is None:
            raise UserInputError(where, f"empty {column}", f"one of {', '.join(MODALITIES)}, or set data.modality")
        return data.modality
    if value not in MODALITIES:
        raise UserInputError(where, f"unknown modality '{row[column]}' in column {column}",
                             f"one of {', '.join(MODALITIES)}")
    return value


def _split(row: dict[str, str], column: str | None, where: str) -> str | None:
    if column is None:
        return None
    value = row[column].strip().lower()
    if value not in SPLIT_ALIASES:
        raise UserInputError(where, f"unknown split '{row[column]}'", f"allowed: {', '.join(SPLIT_ALIASES)}")
    return SPLIT_ALIASES[value]

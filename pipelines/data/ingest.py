"""The data stage: source -> records -> checks -> patient-disjoint splits -> preprocessed cache -> manifest.

Plain Python: the Prefect flows call ``ingest`` as a task, notebooks call it directly. Nothing is written
for a run until every case has passed its checks; the manifest and summary are written last, atomically.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from radsynth.configs.errors import UserInputError
from radsynth.configs.schema import DataConfig, RadsynthConfig

from .adapters import read_source
from .cache import PreprocessedCache, cache_key
from .checks import ConstantImage, check_image, check_label, pooled_label_values
from .io import Image, read_image, write_json
from .manifest import CaseRecord, check_attributes, check_unique_case_ids, with_record_fields, write_manifest
from .pooling import POOLED_WHERE, pooled_records
from .preprocess import PreprocessedCase, preprocess_case
from .splits import assign_splits, check_named_attributes
from .summary import summarize


@dataclass
class IngestResult:
    records: list[CaseRecord]
    manifest_path: Path
    summary_path: Path
    cache_dir: Path
    summary: dict
    preprocessed: int  # cases preprocessed in this run (the rest came from the cache)


def data_dir(config: RadsynthConfig) -> Path:
    return config.output_dir / "data"


def ingest(config: RadsynthConfig, progress: bool = True) -> IngestResult:
    data = config.data
    out = data_dir(config)
    if data.sources:
        where, records = POOLED_WHERE, pooled_records(data, out / "source")
    else:
        where, records = data.root or f"phantom:{data.phantom.kind}", read_source(data, out / "source")
    if not records:
        raise UserInputError(where, "no cases found", f"see the layout expected by format '{data.format}'")
    check_unique_case_ids(records, where)
    check_attributes(records)
    conditioning = config.conditioning
    named = {"data.split.stratify_by": [data.split.stratify_by] if data.split.stratify_by else [],
             "conditioning.attributes": list(conditioning.attributes),
             "conditioning.class_attribute": [conditioning.class_attribute] if conditioning.class_attribute else [],
             "diffusion.balance_by": [config.diffusion.balance_by] if config.diffusion.balance_by else []}
    records = with_record_fields(records, [key for keys in named.values() for key in keys])
    check_named_attributes(records, named)
    if data.label_names is not None:
        records = [record.model_copy(update={"label_names": dict(data.label_names)}) for record in records]
    _check_dimensions(records, data)
    records = assign_splits(records, data.split, where)

    cache = PreprocessedCache(out / "cache", cache_key(data))
    todo = [record for record in records if not cache.is_current(record.case_id, record.sha256)]
    skipped: list[CaseRecord] = []
    with cache:
        for record, case in _preprocess_all(todo, data, config.runtime.num_workers, progress):
            if case is None:
                skipped.append(record)
            else:
                cache.put(record.case_id, record.sha256, case)
    dropped = {record.case_id for record in skipped}
    records = [record for record in records if record.case_id not in dropped]

    manifest_path = write_manifest(records, out / "manifest.jsonl")
    summary = summarize(records, cache)
    if skipped:
        summary["skipped_constant_images"] = dict(Counter(record.source for record in skipped))
    summary.update(manifest=str(manifest_path), cache=str(cache.folder))
    summary_path = write_json(out / "summary.json", summary)
    return IngestResult(records, manifest_path, summary_path, cache.folder, summary, len(todo))


def load_case(record: CaseRecord, data: DataConfig) -> tuple[Image, Image | None]:
    """Read and check one case's image and label, decoding source conventions (8-bit 0/255 masks)."""
    image = read_image(record.image, pixel_spacing=record.spacing)
    check_image(image, record.image)
    if record.label is None:
        return image, None
    label = read_image(record.label, pixel_spacing=record.spacing)
    threshold = data.source_of(record.source).mask_threshold
    if threshold is not None:
        below = sorted(int(v) for v in np.unique(label.array) if 0 < v < threshold)
        if below:  # 0/1/2 label maps, or several labels: the threshold would merge them or erase them
            raise UserInputError(record.label, f"mask values {below[:5]} lie between 0 and "
                                 f"data.image_folder.mask_threshold {threshold}: they would become background",
                                 "0/255 binary masks with the threshold, or mask_threshold: null to keep label values")
        label.array = (label.array >= threshold).astype(np.uint8)
    if record.label_values is not None:
        label.array = pooled_label_values(label.array, record.label_values, record.label)
    label.array = check_label(label, image, record.label_names, record.label)
    return image, label


def preprocess_record(record: CaseRecord, data: DataConfig) -> PreprocessedCase:
    image, label = load_case(record, data)
    return preprocess_case(image, label, record.modality, data.preprocess)


def _preprocess_or_skip(record: CaseRecord, data: DataConfig) -> PreprocessedCase | None:
    """None for an image of one value from a source that skips them (``skip_constant``)."""
    try:
        return preprocess_record(record, data)
    except ConstantImage:
        if getattr(data.source_of(record.source), "skip_constant", False):
            return None
        raise


def _preprocess_all(records: list[CaseRecord], data: DataConfig, workers: int, progress: bool):
    # `with` closes the bar on error too, so the error message starts on a line of its own.
    disable = True if not progress or not records else None  # None: only on a terminal
    with tqdm(total=len(records), desc="preprocess", unit="case", disable=disable) as bar:
        if workers > 1 and len(records) > 4 * workers:
            chunk = max(1, len(records) // (8 * workers))
            with ProcessPoolExecutor(max_workers=workers) as pool:
                cases = pool.map(_preprocess_or_skip, records, [data] * len(records), chunksize=chunk)
                for record, case in zip(records, cases):
                    bar.update()
                    yield record, case
        else:
            for record in records:
                yield record, _preprocess_or_skip(record, data)
                bar.update()


def _check_dimensions(records: list[CaseRecord], data: DataConfig) -> None:
    expected = data.spatial_dims
    for record in records:
        if record.spatial_dims != expected:
            raise UserInputError(
                record.image,
                f"image is {record.spatial_dims}D but data.preprocess.target_shape has {expected} entries",
                f"use a {record.spatial_dims}D target_shape for this dataset",
            )

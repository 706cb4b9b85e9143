"""What of a build may appear in a release: the one place that decides it for provenance, card and report.

- Config: every setting except where things live on this machine (``LOCAL_FIELDS``: data roots, output and
  model folders, cluster addresses) and the text of configured prompts (their count is kept).
- Training data: aggregate counts only, and a count below ``SMALL_CELL`` shows as "<5": a rare value of a
  training attribute can single out a patient. Attributes appear only when they are prompted (they show in
  every released caption anyway); other manifest columns may hold identifiers or free text. Nothing else of the
  ingest summary (local paths, per-file notes) is passed on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from radsynth.configs import RadsynthConfig

SMALL_CELL = 5
REDACTED = "<local>"
# Dotted config fields that name a place on this machine or network.
LOCAL_FIELDS = ("data.root", "data.image_folder.csv", "data.image_folder.images_dir", "data.image_folder.masks_dir",
                "data.msd.images_dir", "data.msd.labels_dir", "data.dicom.labels_dir", "conditioning.pretrained_path",
                "finetune.from", "scoring.sample_dir", "release.destination", "runtime.output_dir",
                "runtime.cluster_address", "runtime.launch.main_process_ip", "runtime.launch.config_file")
# Aggregates of the ingest summary that a release may carry, each a count or a table of counts.
TRAINING_DATA_FIELDS = ("dataset_cases", "patients", "modality", "body_region", "origin", "licenses", "splits",
                        "with_label", "source_shape", "source_spacing", "preprocessed_shape", "label_names",
                        "label_fraction_train", "intensity_train")


def redacted_config(config: RadsynthConfig) -> dict:
    values = config.model_dump(mode="json", by_alias=True)
    for dotted in LOCAL_FIELDS:
        _redact(values, dotted.split("."))
        if dotted.startswith("data."):  # each pooled source has its own root and folders
            for source in values["data"].get("sources") or []:
                _redact(source, dotted.split(".")[1:])
    prompts = values["sampling"].get("prompts")
    if prompts:
        values["sampling"]["prompts"] = f"{len(prompts)} prompts from the config"
    return values


def _redact(values: dict, path: list[str]) -> None:
    *parents, leaf = path
    section = values
    for part in parents:
        section = section.get(part) or {}
    if section.get(leaf) not in (None, ""):
        section[leaf] = REDACTED


def redacted_training_data(summary: Mapping, prompted: Iterable[str]) -> dict:
    kept = {key: summary[key] for key in TRAINING_DATA_FIELDS if key in summary}
    for key in ("modality", "body_region", "origin", "licenses"):
        if isinstance(kept.get(key), Mapping):
            kept[key] = suppress_small_cells(kept[key])
    if isinstance(kept.get("splits"), Mapping):
        kept["splits"] = {name: suppress_small_cells(counts) for name, counts in kept["splits"].items()}
    attributes = summary.get("attributes") or {}
    kept["attributes"] = {name: suppress_small_cells(attributes[name]) for name in prompted
                          if isinstance(attributes.get(name), Mapping) and "median" not in attributes[name]}
    return kept


def suppress_small_cells(counts: Mapping) -> dict:
    return {key: f"<{SMALL_CELL}" if isinstance(value, int) and not isinstance(value, bool) and value < SMALL_CELL
            else value for key, value in counts.items()}

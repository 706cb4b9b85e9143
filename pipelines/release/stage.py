"""The release stage: filter the scored samples, gate the dataset, write the formats, card and report, publish.

``release(config)`` reads a build's samples (``<output_dir>/samples``) and scorecard (``<output_dir>/eval``), drops
every sample the per-sample checks flag, evaluates the dataset-level gates and then either publishes a new
version under ``<destination>/<name>/vN`` (atomically; the same build twice is a no-op) or writes a refusal
report to ``<destination>/<name>/refused/`` and raises ``ReleaseRefused``. Nothing that names a training case
(the per-sample table holds nearest-neighbour ids) is ever copied into a release.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from radsynth.configs import RadsynthConfig, UserInputError
from radsynth.pipelines.data.ingest import data_dir
from radsynth.pipelines.data.io import write_json, write_text
from radsynth.pipelines.model_card import training_compute
from radsynth.pipelines.sampling.compute_log import sampling_compute
from radsynth.pipelines.scoring.evaluate import build_eval_dir, build_sample_dir
from radsynth.pipelines.scoring.scorecard import read_scorecard, software_versions
from radsynth.pipelines.training import sampling_model_dir

from .card import write_dataset_card
from .formats import FORMAT_WRITERS, check_format_supports
from .gate import GateCheck, GateResult, evaluate_gates, scored_bytes_check, scoring_settings_check
from .publish import Published, publish
from .redaction import redacted_config, redacted_training_data
from .report import write_html_report
from .samples import DatasetInfo, ReleaseSample, read_sample_folder
from .selection import Selection, read_per_sample, select_samples

REFUSED = "refused"
LIMITATIONS = (
    "Scores are computed in feature spaces built offline (random CNN, radiomics, a self-supervised encoder trained on "
    "the same real data); they are comparable with their real-vs-real floors, not with published FID values.",
    "Privacy checks bound what they test (pixel and embedding near copies, distance to closest record, a white-box "
    "membership attack); they are not a formal guarantee such as differential privacy.",
    "Synthetic images reflect the training data, its biases and its label quality; rare findings are as "
    "reliable as the few real cases they were learned from.",
    "Not validated for any clinical use.",
)


class ReleaseRefused(Exception):
    """The gate failed: nothing was published; ``report`` is the refusal report's folder."""

    def __init__(self, gate: GateResult, report: Path):
        self.gate, self.report = gate, report
        failed = "; ".join(f"{c.name} [{c.stratum}]: {c.reason}" for c in gate.failed)
        super().__init__(f"release refused by the gate ({len(gate.failed)} failed: {failed}); report in {report}")


@dataclass(frozen=True)
class ReleaseResult:
    published: Published
    selection: Selection
    gate: GateResult
    formats: list[str]

    def summary(self) -> dict:
        folder = self.published.folder
        return {"release": str(folder), "version": self.published.version, "reused": self.published.reused,
                "latest": str(folder.parent / "latest"), "formats": self.formats, "gate_passed": self.gate.passed,
                **self.selection.summary(), "report": str(folder / "report.html"), "card": str(folder / "README.md")}


def release_root(config: RadsynthConfig) -> Path:
    destination = Path(config.release.destination) if config.release.destination else config.output_dir / "release"
    return destination / (config.release.name or config.data.name)


def release(config: RadsynthConfig, samples_dir: str | Path | None = None, eval_dir: str | Path | None = None,
            model_dir: str | Path | None = None) -> ReleaseResult:
    samples_dir = Path(samples_dir or build_sample_dir(config))
    eval_dir = Path(eval_dir or build_eval_dir(config))
    scorecard = read_scorecard(eval_dir / "scorecard.json")
    samples = read_sample_folder(samples_dir)
    training_data = _training_summary(config)
    info = dataset_info(config, samples, training_data)
    for name in config.release.formats:  # a config the samples cannot fill is refused before any work
        check_format_supports(name, samples, info)

    selection = select_samples(samples, read_per_sample(eval_dir / "per_sample.csv"), config.release)
    gate = evaluate_gates(scorecard, config.release.gate)
    gate.checks += [scored_bytes_check(selection.changed_share, selection.changes),
                    scoring_settings_check(scorecard, config.scoring)]
    gate.checks.append(GateCheck("released_samples", "all", float(len(selection.kept)), 1.0, ">=",
                                 bool(selection.kept), False, f"{len(selection.kept)} samples left after the filter"))
    root = release_root(config)
    if not gate.passed:
        raise ReleaseRefused(gate, _write_refusal(root, gate, selection))

    fingerprint = _fingerprint(config, info, selection.kept, eval_dir / "scorecard.json", gate)
    model_card = Path(model_dir or sampling_model_dir(config)) / "README.md"

    def write(folder: Path, version: str) -> None:
        provenance = build_provenance(config, info, selection, scorecard, gate, training_data)
        provenance["dataset"]["version"] = version
        provenance["generator"]["model_card"] = "model_card.md" if model_card.is_file() else None
        provenance["compute"] = release_compute(model_card.parent, samples_dir, selection.kept)
        for name in config.release.formats:
            FORMAT_WRITERS[name](selection.kept, _format_folder(folder, name, config, info), info)
        if model_card.is_file():
            write_text(folder / "model_card.md", model_card.read_text(encoding="utf-8"))
        write_json(folder / "scorecard.json", scorecard)
        write_json(folder / "provenance.json", {**provenance, "fingerprint": fingerprint})
        write_html_report(folder, selection.kept, provenance)
        write_dataset_card(folder, provenance)  # last: its structure section lists what is in the folder

    published = publish(root, fingerprint, write, keep=config.release.keep_versions)
    return ReleaseResult(published, selection, gate, list(config.release.formats))


def dataset_info(config: RadsynthConfig, samples: list[ReleaseSample], training_data: dict) -> DatasetInfo:
    attributes = list(config.conditioning.attributes)
    modalities = sorted(training_data.get("modality", {}))
    if len(modalities) > 1:  # one release is one modality: its formats declare a single channel kind
        raise UserInputError("data.sources", f"the model was trained on {'+'.join(modalities)}: a multi-modality "
                             "base is pretraining, not a dataset to release", "fine-tune it on one dataset "
                             "(finetune.from) and release that")
    modality = config.data.modality or next(iter(modalities), None) or str(samples[0].sidecar.get("modality", ""))
    label_names = {int(k): str(v) for k, v in (training_data.get("label_names") or {}).items()}
    return DatasetInfo(
        name=config.release.name or config.data.name, modality=modality,
        spatial_dims=len(samples[0].sidecar.get("shape") or ()) or 2,
        label_names=label_names if all(s.label_path is not None for s in samples) else {},
        attributes=attributes, class_attribute=config.conditioning.class_attribute or next(iter(attributes), None),
        description=f"Synthetic {modality} images generated by radsynth from '{config.data.name}'",
        license=release_license(config, training_data),
    )


def release_license(config: RadsynthConfig, training_data: dict) -> str:
    """``release.license``, or the training data's license when all its cases share one. A generator trained on
    share-alike (CC BY-SA) or non-commercial data makes data its terms still cover, so the release inherits them
    rather than claiming a freer license; mixed or unknown licenses leave it to the card's reader ("other")."""
    if config.release.license:
        return config.release.license
    licenses = sorted(training_data.get("licenses") or {})
    if len(licenses) == 1 and licenses[0].lower() != "unknown":
        return f"{licenses[0]} (the training data's license; synthetic data)"
    return f"other (training data: {', '.join(licenses) or 'unknown'}; see the dataset card)"


def build_provenance(config: RadsynthConfig, info: DatasetInfo, selection: Selection, scorecard: dict,
                     gate: GateResult, training_data: dict) -> dict:
    first = selection.kept[0].sidecar
    return {
        "dataset": {"name": info.name, "version": None, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "modality": info.modality, "spatial_dims": info.spatial_dims, "n_samples": len(selection.kept),
                    "label_names": {str(k): v for k, v in info.label_names.items()},
                    "class_attribute": info.class_attribute if "imagefolder" in config.release.formats else None,
                    "formats": list(config.release.formats), "internal": config.release.internal,
                    "derived_from_real": sum(s.derived_from_real for s in selection.kept), "license": info.license},
        # What the samples' sidecars say they were drawn with, never the current config (it may describe another model).
        "generator": {key: first.get(key) for key in ("model_hash", "objective", "scheduler", "num_inference_steps",
                                                       "guidance_scale", "guidance_interval", "distilled_guidance_scale",
                                                       "differential_privacy")
                      if key in first}
        | {"model_card": None},
        "training_data": redacted_training_data(training_data, config.conditioning.attributes),
        "config": redacted_config(config),
        "seeds": {"runtime_seed": config.runtime.seed,
                  "sample_seeds": "derived from (model hash, sampling config, sample index); listed in each sidecar"},
        "software": software_versions(),
        "scorecard": {"sizes": scorecard.get("sizes", {}), "verdicts": scorecard.get("verdicts", {}),
                      "rows": headline_rows(scorecard)},
        "filter": selection.summary(),
        "gate": gate.to_dict(),
        "limitations": list(LIMITATIONS),
    }


def release_compute(model_folder: Path, samples_dir: Path, kept: list[ReleaseSample]) -> dict:
    """What the released images cost: the model's training (its ``compute.json``, once for the model) and the
    sampling of these images (the sample folder's log); None where a figure was not recorded."""
    training = training_compute(model_folder)
    if training is not None:
        training = {"seconds": training["training_seconds"], "energy_j": training["training_energy_j"],
                    "devices": sorted({part["device"] for part in training["parts"].values()})}
    return {"training": training, "sampling": sampling_compute(samples_dir, [sample.sample_id for sample in kept])}


def headline_rows(scorecard: dict) -> list[dict]:
    """The rows a reader needs first: overall realism in every space, adherence, privacy and utility."""
    headline = {"frechet_distance", "kid", "precision", "recall", "coverage", "ms_ssim_between_samples",
                "mask_dice_ratio", "attribute_balanced_accuracy_ratio", "copy_rate", "dcr_share",
                "membership_inference_auc", "membership_inference_tpr_at_1pct_fpr", "auc synthetic minus real",
                "dice synthetic minus real"}
    return [row for row in scorecard.get("rows", [])
            if row["metric"] in headline and (row["stratum"] == "all" or row["metric"] == "mask_dice_ratio"
                                              or row["section"] in ("adherence", "utility"))]


def _format_folder(folder: Path, name: str, config: RadsynthConfig, info: DatasetInfo) -> Path:
    if name == "nnunet":  # nnU-Net finds datasets by this folder name inside nnUNet_raw
        return folder / "nnunet" / f"Dataset{config.release.nnunet_dataset_id:03d}_{info.name.replace('-', '_')}"
    return folder / name


def _training_summary(config: RadsynthConfig) -> dict:
    """The ingest summary minus local paths: counts, licenses, label names, attribute distributions."""
    path = data_dir(config) / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else {}
    return {key: value for key, value in summary.items() if key not in ("manifest", "cache")}


def _fingerprint(config: RadsynthConfig, info: DatasetInfo, samples: list[ReleaseSample], scorecard: Path,
                 gate: GateResult) -> str:
    """Equal for equal builds: the released files' bytes, the scorecard, the release settings, what the formats
    are told about the dataset (its license, labels, attributes) and the gate."""
    digest = hashlib.sha256()
    for sample in samples:
        for path in (sample.image_path, sample.label_path, sample.sidecar_path):
            if path is not None:
                digest.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    digest.update(hashlib.sha256(scorecard.read_bytes()).digest())
    digest.update(json.dumps(config.release.model_dump(mode="json"), sort_keys=True).encode())
    digest.update(json.dumps(asdict(info), sort_keys=True, default=str).encode())
    digest.update(json.dumps(gate.to_dict(), sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _write_refusal(root: Path, gate: GateResult, selection: Selection) -> Path:
    folder = root / REFUSED
    report = {**gate.to_dict(), "filter": selection.summary(),
              "refused_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_json(folder / "gate_report.json", report)
    write_text(folder / "gate_report.md", gate.to_markdown())
    return folder

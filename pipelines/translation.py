"""The translate stage: a folder of one modality's images and labels -> the same cases as another modality.

``radsynth translate CONFIG --from ct --to mri --source DIR`` reads an MSD / nnU-Net raw folder of the source
modality, preprocesses it onto the model's grid as training data was, translates each case and writes it as a
sample (image + the source's own label map on the same grid + sidecar) that ``evaluate``, the gate and ``release``
read like any other. Two methods (``translation.method``):

- ``diffusion``: the trained multi-modality model (``pipelines.sampling.translation``), its ControlNet steered by
  the source's label map when both exist;
- ``cycle_gan``: the unpaired baseline (``generators.cycle_gan``), trained here on the training split's images of
  the two modalities the first time it is asked for (its folder is stamped like every training part).

Every output is derived from a real image: its sidecar says so and names its source case, so it never goes into a
public release. Label names are carried by name into the model's vocabulary; a source label the model has no name
for becomes background and the sidecar lists it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers.utils import logging as diffusers_logging
from tqdm.auto import tqdm

from radsynth.configs import RadsynthConfig, UserInputError
from radsynth.configs.schema import MODALITIES, DataConfig, modality_parts
from radsynth.generators.compute import ComputeMeter
from radsynth.generators.cycle_gan import CycleGANTrainer, RadsynthCycleGAN
from radsynth.generators.data import CachedImages, ConditioningSpec
from radsynth.generators.prompts import prompt_attributes, render_prompt

from .data.adapters.msd import image_cases, read_msd
from .data.ingest import preprocess_record
from .data.manifest import CaseRecord, file_sha256, with_record_fields
from .data.pooling import label_key
from .data.preprocess import IntensityMap
from .sampling.compute_log import log_batch
from .sampling.generate import sampling_device
from .sampling.pipeline import CONTROLNET_FOLDER, model_hash, modules_hash
from .sampling.sidecar import sample_files
from .sampling.translation import RadsynthTranslationPipeline
from .sampling.writers import write_sample
from .training import (
    ingested_dataset,
    label_vocabulary,
    loop_settings,
    part_fingerprint,
    save_atomically,
    split_cases,
    start_over_if_changed,
    trained_model_dir,
)

__all__ = ["SourceCase", "TranslationResult", "cycle_gan_dir", "expected_translations", "source_cases",
           "target_attributes", "translate", "translation_id", "translation_sample_dir"]

CYCLE_GAN_DIR = "cycle_gan"


@dataclass
class SourceCase:
    """One source case on the model's grid: image in [-1, 1] (1, *shape), label map in the model's vocabulary."""

    record: CaseRecord
    image: np.ndarray
    label: np.ndarray | None
    affine: np.ndarray  # voxel -> world of the grid it was preprocessed onto: the translation's and its label's
    dropped_labels: list[str]


@dataclass
class TranslationResult:
    sample_dir: Path
    written: list[str]
    method: str
    model_hash: str
    source_cases: int


def translation_dir(config: RadsynthConfig) -> Path:
    return config.output_dir / "translation"


def translation_sample_dir(config: RadsynthConfig, source: str, target: str) -> Path:
    """Where ``translate`` writes by default: one folder per direction and method."""
    return translation_dir(config) / f"{source}-to-{target}-{config.translation.method}"


def cycle_gan_dir(config: RadsynthConfig, source: str, target: str) -> Path:
    pair = "-".join(sorted((source, target)))
    return translation_dir(config) / f"{CYCLE_GAN_DIR}-{pair}"


def translate(config: RadsynthConfig, source_dir: str | Path, source: str, target: str, *,
              model_dir: str | Path | None = None, sample_dir: str | Path | None = None,
              progress: bool = True) -> TranslationResult:
    """Translate every case of ``source_dir`` (modality ``source``) into modality ``target``; see the module."""
    check_modalities(source, target)
    records, summary = ingested_dataset(config)
    cases = source_cases(config, source_dir, source, records)
    target_region = _body_region(records, target)
    translator = (_DiffusionTranslator(config, model_dir, source, target, progress)
                  if config.translation.method == "diffusion"
                  else _CycleGANTranslator(config, records, summary, source, target, progress))
    sample_dir = Path(sample_dir or translation_sample_dir(config, source, target))
    _remove_other_translations(sample_dir, {translation_id(case.record.case_id) for case in cases})
    written, meter = [], ComputeMeter(translator.device)
    batch_size = config.translation.batch_size
    batches = [cases[i:i + batch_size] for i in range(0, len(cases), batch_size)]
    for batch in tqdm(batches, desc="translate", unit="batch", disable=None if progress else True):
        targets = [target_attributes(case.record, target, target_region) for case in batch]
        images = translator(batch, targets)
        batch_written = []
        for case, attributes, image in zip(batch, targets, images):
            sample = translation_id(case.record.case_id)
            write_sample(sample_dir, sample, translator.to_physical(image[0]), case.affine, translator.fmt,
                         _sidecar(config, translator, case, attributes, source, target), label=_label_or_none(case),
                         png_range=translator.intensity_range)
            batch_written.append(sample)
        log_batch(sample_dir, batch_written, *meter.take(), meter.device)
        written += batch_written
    return TranslationResult(sample_dir, written, config.translation.method, translator.model_hash, len(cases))


def check_modalities(source: str, target: str) -> None:
    for flag, modality in (("--from", source), ("--to", target)):
        if modality not in MODALITIES:
            raise UserInputError(flag, f"unknown modality '{modality}'", f"one of {', '.join(MODALITIES)}")
    if source == target:
        raise UserInputError("--to", f"the same modality as --from ({source})", "another modality to translate into")


# ------------------------------------------------------------------------------------------------ source

def source_cases(config: RadsynthConfig, source_dir: str | Path, modality: str,
                 training_records: Sequence[CaseRecord]) -> list[SourceCase]:
    """The cases of an MSD / nnU-Net raw folder of ``modality``, preprocessed as the model's training data was."""
    source_dir = Path(source_dir)
    if not (source_dir / "dataset.json").is_file():
        raise UserInputError(source_dir, "no dataset.json here",
                             "an MSD / nnU-Net raw folder (imagesTr/, labelsTr/, dataset.json) of the source modality")
    data = DataConfig(name="translation-source", format="msd", root=str(source_dir),
                      body_region=_body_region(training_records, modality), preprocess=config.data.preprocess)
    records = read_msd(data, source_dir)
    if not records:
        raise UserInputError(source_dir / "imagesTr", "no images", "NIfTI images of the source modality")
    found = {record.modality for record in records}
    if found != {modality}:
        raise UserInputError(source_dir / "dataset.json", f"the folder holds {', '.join(sorted(found))} images",
                             f"images of --from {modality}")
    vocabulary = {label_key(name): value for value, name in label_vocabulary(list(training_records)).items()}
    records = with_record_fields(records, config.conditioning.attributes)
    return [_source_case(record, data, vocabulary) for record in records]


def _source_case(record: CaseRecord, data: DataConfig, vocabulary: dict[str, int]) -> SourceCase:
    dims = data.spatial_dims
    if len(record.shape) != dims:
        raise UserInputError(record.image, f"a {len(record.shape)}D image", f"{dims}D images, as the model was trained on")
    case = preprocess_record(record, data)
    if case.label is None:
        return SourceCase(record, case.image, None, case.affine, [])
    carried, dropped = np.zeros_like(case.label), []
    for value, name in record.label_names.items():
        if value == 0:
            continue
        if label_key(name) in vocabulary:
            carried[case.label == value] = vocabulary[label_key(name)]
        elif (case.label == value).any():
            dropped.append(name)
    return SourceCase(record, case.image, carried, case.affine, dropped)


def _body_region(records: Sequence[CaseRecord], modality: str) -> str | None:
    """The region the model learnt this modality at, when it learnt one (the prompt must name it as training did)."""
    regions = {record.body_region for record in records if record.modality == modality}
    return regions.pop() if len(regions) == 1 else None


def target_attributes(record: CaseRecord, target: str, target_region: str | None) -> dict:
    """The source case's conditions as the target modality: that modality, and the region the model learnt it at
    (a pool may name one region differently per modality, e.g. CT "thorax_abdomen", MRI "abdomen")."""
    attributes = {**record.attributes, "modality": target}
    if target_region is not None and "body_region" in attributes:
        attributes["body_region"] = target_region
    return attributes


def _label_or_none(case: SourceCase) -> np.ndarray | None:
    return None if case.label is None else case.label[0]


def translation_id(case_id: str) -> str:
    """The sample id a source case's translation is written under."""
    return "tr_" + re.sub(r"[^A-Za-z0-9._-]+", "_", case_id)


def expected_translations(source_dir: str | Path) -> set[str]:
    """The sample ids translating ``source_dir`` writes (empty when it is no MSD folder: translate says why)."""
    images = Path(source_dir) / "imagesTr"
    return {translation_id(case_id) for case_id, _ in image_cases(images)} if images.is_dir() else set()


def _remove_other_translations(sample_dir: Path, keep: set[str]) -> None:
    """Delete the translations of cases this run does not translate: evaluate scores every image of the folder,
    and a rerun on a source folder that lost cases must not leave their old translations to be scored."""
    for sidecar_path in sorted(sample_dir.glob("tr_*.json")):
        if sidecar_path.stem in keep:
            continue
        images, labels = sample_files(sidecar_path.stem)  # the only names the sample's files may have
        for name in (*images, *labels):
            (sample_dir / name).unlink(missing_ok=True)
        sidecar_path.unlink()  # last: a run killed before it finds the sample again and finishes


def _sidecar(config: RadsynthConfig, translator, case: SourceCase, attributes: dict, source: str, target: str) -> dict:
    keys = list(config.conditioning.attributes)
    return {"prompt": render_prompt("", attributes, keys), "conditions": prompt_attributes(attributes, keys), "seed": 0,
            **translator.sampler, "model_hash": translator.model_hash, "modality": target,
            "derived_from_real": True, "source_case": case.record.case_id,
            "translation": {"method": config.translation.method, "from": source, "to": target,
                            "strength": config.translation.strength if config.translation.method == "diffusion" else None,
                            "labels_carried": case.label is not None, "dropped_labels": case.dropped_labels}}


# ------------------------------------------------------------------------------------------------ methods

class _Translator:
    """What writing a translated case needs of a method: its units, format, hash and sampler record."""

    device: torch.device
    model_hash: str
    sampler: dict
    intensity_range: tuple[float, float]
    spatial_dims: int

    @property
    def fmt(self) -> str:
        return "png16" if self.spatial_dims == 2 else "nifti"

    def to_physical(self, image: np.ndarray) -> np.ndarray:
        low, high = self.intensity_range
        return IntensityMap("percentile", low, high).inverse(image)


class _DiffusionTranslator(_Translator):
    def __init__(self, config: RadsynthConfig, model_dir: str | Path | None, source: str, target: str,
                 progress: bool):
        model_dir = Path(model_dir or trained_model_dir(config))
        index = model_dir / "model_index.json"
        if not index.is_file():
            raise UserInputError(model_dir, "no trained model here", "run `radsynth train CONFIG` first")
        knows = modality_parts(json.loads(index.read_text()).get("modality", ""))
        missing = [modality for modality in (source, target) if modality not in knows]
        if missing:  # before loading anything
            raise UserInputError(model_dir, f"the model was trained on {'+'.join(knows)} only, not on "
                                 f"{', '.join(missing)}", "a model trained on both modalities (data.sources pooling "
                                 "them, e.g. configs/translate-abdomen.yaml)")
        settings = config.translation
        if not progress:
            diffusers_logging.disable_progress_bar()
        optional = (CONTROLNET_FOLDER,) if settings.use_labels else ()
        self.pipeline = RadsynthTranslationPipeline.from_model_dir(model_dir, optional).to(sampling_device(config))
        self.pipeline.set_progress_bar_config(disable=True)
        self.use_labels = self.pipeline.mask_controlnet is not None
        self.config, self.source, self.target = config, source, target
        self.device, self.model_hash = self.pipeline.device, model_hash(self.pipeline)
        pipeline_config = self.pipeline.config
        self.intensity_range = (pipeline_config.intensity_low, pipeline_config.intensity_high)
        self.spatial_dims = pipeline_config.spatial_dims
        self.sampler = {"scheduler": "probability_flow_inversion", "num_inference_steps": settings.num_inference_steps,
                        "guidance_scale": settings.guidance_scale, "objective": pipeline_config.objective}

    def __call__(self, cases: list[SourceCase], targets: list[dict]) -> np.ndarray:
        keys = list(self.config.conditioning.attributes)
        # The source side as preprocessed: its record already names the region the model learnt the source at.
        sources = [{**case.record.attributes, "modality": self.source} for case in cases]
        labelled = self.use_labels and all(case.label is not None for case in cases)
        settings = self.config.translation
        return self.pipeline(np.stack([case.image for case in cases]),
                             [render_prompt("", values, keys) for values in sources],
                             [render_prompt("", values, keys) for values in targets],
                             label_maps=np.stack([case.label for case in cases]) if labelled else None,
                             source_conditions=sources, target_conditions=targets,
                             strength=settings.strength, num_inference_steps=settings.num_inference_steps,
                             guidance_scale=settings.guidance_scale, conditioning_scale=self.config.controlnet.conditioning_scale
                             ).images


class _CycleGANTranslator(_Translator):
    def __init__(self, config: RadsynthConfig, records: list[CaseRecord], summary: dict, source: str, target: str,
                 progress: bool):
        self.model = train_cycle_gan(config, records, summary, (source, target), progress).eval()
        self.device = torch.device(sampling_device(config))
        self.model.to(self.device)
        self.source, self.target = source, target
        self.model_hash = modules_hash({"cycle_gan": self.model})
        intensity = summary["intensity_train"]
        self.intensity_range = (-1.0, 1.0) if intensity["mode"] == "none" else (intensity["low"], intensity["high"])
        self.spatial_dims = config.data.spatial_dims
        self.sampler = {"scheduler": "cycle_gan", "num_inference_steps": 1, "guidance_scale": 0.0}

    @torch.no_grad()
    def __call__(self, cases: list[SourceCase], targets: list[dict]) -> np.ndarray:  # one mapping: no conditions
        images = torch.as_tensor(np.stack([case.image for case in cases]), device=self.device)
        return self.model(images, self.source, self.target).cpu().numpy()


def train_cycle_gan(config: RadsynthConfig, records: list[CaseRecord], summary: dict, modalities: tuple[str, str],
                    progress: bool = True) -> RadsynthCycleGAN:
    """The CycleGAN between ``modalities`` on the training split's images of each, trained once and reused."""
    modalities = tuple(sorted(modalities))
    train = split_cases(records, "train")
    by_modality = {modality: [r for r in train if r.modality == modality] for modality in modalities}
    empty = [modality for modality, cases in by_modality.items() if not cases]
    if empty:
        raise UserInputError("translation.method", f"no {', '.join(empty)} images in the training split to train the "
                             "CycleGAN on", "a config whose data pools both modalities (data.sources)")
    folder = cycle_gan_dir(config, *modalities)
    final = folder / "model"
    settings = config.translation.cycle_gan
    start_over_if_changed(folder, part_fingerprint(config, "translation.cycle_gan",
                                                   upstream=file_sha256(summary["manifest"])))
    if (final / "config.json").is_file():
        return RadsynthCycleGAN.from_pretrained(final)
    torch.manual_seed(config.runtime.seed + 5)
    model = RadsynthCycleGAN(spatial_dims=config.data.spatial_dims, modalities=modalities,
                             channels=tuple(settings.channels), num_res_units=settings.num_res_units)
    images = tuple(CachedImages(by_modality[modality], summary["cache"], ConditioningSpec()) for modality in modalities)
    trainer = CycleGANTrainer(model, images, folder / "run", loop_settings(config, progress, settings),
                              learning_rate=settings.learning_rate, batch_size=settings.batch_size,
                              seed=config.runtime.seed, cycle_weight=settings.cycle_weight,
                              identity_weight=settings.identity_weight)
    trained = trainer.fit()
    save_atomically(lambda partial: trained.save_pretrained(partial, safe_serialization=True), final)
    return trained


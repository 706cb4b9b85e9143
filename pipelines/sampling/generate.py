"""The generate stage: a trained model folder -> N synthetic images with JSON sidecars.

Each sample's seed derives from (model hash, sampling settings, sample index), so any shard of the N can
be redone or skipped exactly: a sample whose sidecar already records the same seed and model is skipped.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from diffusers.utils import logging as diffusers_logging
from tqdm.auto import tqdm

from radsynth.configs import RadsynthConfig, UserInputError
from radsynth.generators.compute import ComputeMeter
from radsynth.generators.data import ConditioningSpec
from radsynth.generators.prompts import parse_prompt, prompt_attributes
from radsynth.generators.trainer import check_device

from ..data.ingest import data_dir
from ..data.io import remove_temporaries
from ..data.manifest import read_manifest
from .compute_log import log_batch
from .lesion_inpaint import RadsynthLesionInpaintPipeline
from .mask_to_image import RadsynthMaskToImagePipeline
from .pairs import PairSource, SampleCondition, generated_condition, with_lesions
from .pipeline import CONTROLNET_FOLDER, MASK_GENERATOR_FOLDER, RadsynthPipeline, model_hash, unet_reads_label_maps
from .text_to_image import RadsynthTextToImagePipeline
from .text_to_pair import RadsynthTextToPairPipeline
from .writers import write_sample

STUDENT_SCHEDULER = "consistency"  # what a distilled student's sidecars name as their sampler


@dataclass
class GenerateResult:
    sample_dir: Path
    written: list[str]
    skipped: int
    model_hash: str
    latent_std: float | None  # health check: ~1 for a sane sampler (training latents are scaled to std 1)


def load_pipeline(model_dir: str | Path, config: RadsynthConfig, progress: bool = True,
                  pairs: bool | None = None) -> RadsynthPipeline:
    """The trained text-to-image pipeline; for pairs (default ``sampling.pairs``) the mask-to-image one (its
    ControlNet beside it, or its UNet reading the maps), or with ``sampling.mask_source: generated`` the text-to-pair one.

    The sampler is ``sampling.scheduler`` for the objective saved with the model (never ``diffusion.objective``
    of the current config, which may describe another model); a distilled student keeps its own.
    """
    model_dir = Path(model_dir)
    pairs = config.sampling.pairs if pairs is None else pairs
    if not progress:
        diffusers_logging.disable_progress_bar()
    if not (model_dir / "model_index.json").is_file():
        raise UserInputError(model_dir, "no trained model here", "run `radsynth train CONFIG` first")
    kind = RadsynthTextToImagePipeline
    if pairs:
        generated = config.sampling.mask_source == "generated"
        needed, setting = ((MASK_GENERATOR_FOLDER, "mask_generator.enabled: true") if generated
                           else (CONTROLNET_FOLDER, "conditioning.use_masks: true"))
        if not (model_dir / needed).is_dir() and not (needed == CONTROLNET_FOLDER and unet_reads_label_maps(model_dir)):
            raise UserInputError(model_dir, f"no {needed} in this model", f"train with {setting} to generate pairs")
        kind = (RadsynthTextToPairPipeline if generated else
                RadsynthLesionInpaintPipeline if config.sampling.inpaint else RadsynthMaskToImagePipeline)
    device = sampling_device(config)
    pipeline = kind.from_model_dir(model_dir)
    if pipeline.config.distilled_guidance_scale is None:
        pipeline.scheduler = pipeline.base_scheduler(config.sampling.scheduler)
    return pipeline.to(device)


def sampling_device(config: RadsynthConfig) -> str:
    """``runtime.device`` as a torch device: "auto" is CUDA when there is one."""
    check_device(config.runtime.device)
    if config.runtime.device in ("auto", "cuda") and torch.cuda.is_available():
        return "cuda"
    return "cpu" if config.runtime.device == "auto" else config.runtime.device


def sampler_settings(config: RadsynthConfig, pipeline: RadsynthPipeline) -> dict:
    """How every sample is drawn (what changes one sample; batch size and count do not): the configured sampler,
    or a distilled student's own, ``distill.steps`` steps of its learnt guidance and no more guidance on top."""
    distilled, sampling = pipeline.config.distilled_guidance_scale, config.sampling
    # Pairs whose maps are drawn: the mask generator's own guidance, when set, changes them too (a student's maps
    # keep the guidance it learnt).
    maps = ({"mask_guidance_scale": sampling.mask_guidance_scale} if sampling.pairs and
            sampling.mask_source == "generated" and sampling.mask_guidance_scale is not None else {})
    # Set only when configured: absent, the seeds (hashed from these settings) stay those of earlier releases.
    interval = {"guidance_interval": list(sampling.guidance_interval)} if sampling.guidance_interval else {}
    if distilled is None:
        return {"scheduler": sampling.scheduler, "num_inference_steps": sampling.num_inference_steps,
                "guidance_scale": sampling.guidance_scale, **interval, **maps}
    return {"scheduler": STUDENT_SCHEDULER, "num_inference_steps": config.distill.steps, "guidance_scale": 1.0,
            "distilled_guidance_scale": distilled}


def sample_seed(digest: str, config: RadsynthConfig, index: int, sampler: dict) -> int:
    settings = dict(sampler)
    if config.sampling.lesions:  # they change a pair; absent, seeds stay those of earlier releases
        settings["lesions"] = list(config.sampling.lesions)
    if config.sampling.pairs and config.sampling.mask_source != "bank":
        settings["mask_source"] = config.sampling.mask_source
    if config.sampling.inpaint:
        settings["inpaint_margin"] = config.sampling.inpaint_margin
    key = json.dumps({"model": digest, "seed": config.runtime.seed, **settings, "index": index}, sort_keys=True)
    return int(hashlib.sha256(key.encode()).hexdigest()[:15], 16)


def sampling_conditions(config: RadsynthConfig) -> list[SampleCondition]:
    """What the samples are drawn from: the configured prompts (their attribute header read back, the grammar
    ``render_prompt`` writes), or else the attribute values of the test split's cases (real, unseen) in radsynth's
    own templated caption. Never a real case's free text: a report's words would be written into every sidecar
    and every released table."""
    if config.sampling.prompts:
        return [SampleCondition(prompt, None, {"derived_from_real": False}, conditions=parse_prompt(prompt))
                for prompt in config.sampling.prompts]
    records = read_manifest(data_dir(config) / "manifest.jsonl")
    templated = ConditioningSpec(config.conditioning.attributes, include_text=False)
    drawn = [SampleCondition(templated.prompt(record), None, {"derived_from_real": False},
                             conditions=dict(record.attributes)) for record in records if record.split == "test"]
    if not drawn:
        raise UserInputError("sampling.prompts", "no prompts and an empty test split", "give sampling.prompts")
    return drawn


def generate(config: RadsynthConfig, model_dir: str | Path, n_samples: int, sample_dir: str | Path,
             progress: bool = True,
             indices: Sequence[int] | None = None) -> GenerateResult:
    """Samples 0..n_samples-1, or only ``indices`` of them (one shard of a fanned-out run).

    With ``sampling.pairs`` each sample is an image + label-map pair, the label written on the image's grid:
    its mask comes from the bank or the mask generator (``sampling.mask_source``), edited by
    ``sampling.lesions`` (see ``pairs``); with ``sampling.inpaint`` only the edited lesions are generated, into the
    training case's own image.
    """
    pipeline = load_pipeline(model_dir, config, progress)
    pipeline.set_progress_bar_config(disable=True)
    digest = model_hash(pipeline)
    sampling = config.sampling
    bank = PairSource(config, inpaint=sampling.inpaint) if sampling.pairs and sampling.mask_source == "bank" else None
    if bank is None:
        choices = [replace(choice, prompt=with_lesions(choice.prompt, sampling.lesions))
                   for choice in sampling_conditions(config)]
    sample_dir = Path(sample_dir)
    fmt = config.sampling.output_format
    if fmt == "auto":
        fmt = "png16" if pipeline.config.spatial_dims == 2 else "nifti"

    wanted = range(n_samples) if indices is None else indices
    # A shard killed mid-write left its samples' temporaries; each sample belongs to one shard, so this one cleans
    # its own and never a temporary another shard is writing now.
    remove_temporaries(sample_dir, {stem for i in wanted for stem in (sample_id(i), f"{sample_id(i)}_label")})
    sampler = sampler_settings(config, pipeline)
    attribute_keys = list(config.conditioning.attributes)
    todo = {i for i in wanted if not _done(sample_dir, i, sample_seed(digest, config, i, sampler), digest)}
    written, latent_stds = [], []
    batches = _fixed_batches(wanted, config.sampling.batch_size, todo)
    meter = ComputeMeter(pipeline.device)
    for indices in tqdm(batches, desc="generate", unit="batch", disable=None if progress else True):
        seeds = [sample_seed(digest, config, i, sampler) for i in indices]
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        if bank is not None:
            drawn = [bank.draw(seed) for seed in seeds]
        else:
            drawn = [choices[i % len(choices)] for i in indices]
        output = pipeline([pair.prompt for pair in drawn], conditions=[pair.conditions for pair in drawn],
                          num_inference_steps=sampler["num_inference_steps"],
                          guidance_scale=sampler["guidance_scale"], guidance_interval=sampler.get("guidance_interval"),
                          generator=generators, output_type="physical",
                          **_pair_inputs(drawn, config, sampler))
        if getattr(output, "mask_sources", None):  # the maps were generated: their conditions come with them
            drawn = [generated_condition(pair.prompt, label_map[0], edits, pipeline.mask_generator.label_vocabulary)
                     for pair, label_map, edits in zip(drawn, output.label_maps, output.lesions)]
        latent_stds.append(output.latent_std)
        batch_written = []
        for index, seed, pair, image in zip(indices, seeds, drawn, np.asarray(output.images)):
            if index not in todo:
                continue
            sidecar = {"prompt": pair.prompt, "conditions": prompt_attributes(pair.conditions, attribute_keys),
                       "seed": seed, **sampler, "objective": pipeline.config.objective,
                       "model_hash": digest, "sample_index": index,
                       "modality": pipeline.config.modality, **_privacy_guarantee(pipeline), **pair.sidecar}
            write_sample(sample_dir, sample_id(index), image[0], _affine(pipeline), fmt, sidecar,
                         png_range=(pipeline.config.intensity_low, pipeline.config.intensity_high),
                         label=pair.label_map)
            batch_written.append(sample_id(index))
        log_batch(sample_dir, batch_written, *meter.take(), meter.device)
        written += batch_written
    return GenerateResult(sample_dir, written, len(wanted) - len(todo), digest,
                          float(np.mean(latent_stds)) if latent_stds else None)


def _fixed_batches(wanted: Sequence[int], size: int, todo: set[int]) -> list[list[int]]:
    """The batches (index // size) that hold a sample still to write. A resumed run draws a missing sample in the
    very batch an uninterrupted run drew it in, so its bytes are the same: another batch would reorder float sums.
    Only the missing samples of a batch are written."""
    groups = (list(group) for _, group in itertools.groupby(sorted(wanted), key=lambda index: index // size))
    return [group for group in groups if todo.intersection(group)]


def _pair_inputs(drawn: list[SampleCondition], config: RadsynthConfig, sampler: dict) -> dict:
    """The pipeline's arguments for pairs: lesion requests and the mask generator's sampler for generated maps;
    otherwise the drawn maps, and for inpainting the real images and the regions to generate."""
    sampling = config.sampling
    if not sampling.pairs:
        return {}
    inputs = {"conditioning_scale": config.controlnet.conditioning_scale}
    if sampling.mask_source == "generated":
        # The mask generator is never distilled: it keeps the configured steps under a student too.
        return {**inputs, "lesions": sampling.lesions, "mask_inference_steps": sampling.num_inference_steps,
                "mask_guidance_scale": sampler.get("mask_guidance_scale")}
    inputs["label_maps"] = np.stack([pair.label_map[None] for pair in drawn])
    if sampling.inpaint:
        inputs.update(images=np.stack([pair.background[None] for pair in drawn]),
                      regions=np.stack([pair.region[None] for pair in drawn]), margin=sampling.inpaint_margin)
    return inputs


def sample_id(index: int) -> str:
    return f"syn_{index:06d}"


def _done(sample_dir: Path, index: int, seed: int, digest: str) -> bool:
    sidecar = sample_dir / f"{sample_id(index)}.json"
    if not sidecar.is_file():
        return False
    recorded = json.loads(sidecar.read_text())
    return recorded.get("seed") == seed and recorded.get("model_hash") == digest and (
        sample_dir / recorded.get("file", "")).is_file()


def _affine(pipeline: RadsynthTextToImagePipeline) -> np.ndarray:
    """Voxel-to-world of a generated grid: the training grid's spacing (RAS), centred on the origin."""
    spacing = np.asarray(pipeline.config.spacing, dtype=np.float64)
    shape = np.asarray(pipeline.config.image_shape, dtype=np.float64)
    affine = np.diag([*spacing, 1.0])
    affine[:-1, -1] = -0.5 * (shape - 1) * spacing
    return affine


def _privacy_guarantee(pipeline) -> dict:
    """A DP fine-tuned model's formal guarantee, for each sample's sidecar (and so the release's provenance)."""
    guarantee = pipeline.config.get("differential_privacy")
    if not guarantee:
        return {}
    recorded = {key: guarantee[key] for key in ("epsilon", "delta", "unit", "steps_taken", "noise_multiplier",
                                                "sample_rate", "max_grad_norm", "patients", "accountant")}
    if "clipping" in guarantee:  # absent from models made before it was a choice: they clipped (clipping_text)
        recorded["clipping"] = guarantee["clipping"]
    return {"differential_privacy": recorded}

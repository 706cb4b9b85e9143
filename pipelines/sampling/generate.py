"""The generate stage: a trained model folder -> N synthetic images with JSON sidecars.

Each sample's seed derives from (model hash, sampling settings, sample index), so any shard of the N can
be redone or skipped exactly: a sample whose sidecar already records the same seed and model is skipped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers.utils import logging as diffusers_logging
from tqdm.auto import tqdm

from radsynth.configs import RadsynthConfig, UserInputError
from radsynth.generators.data import ConditioningSpec
from radsynth.generators.objectives import build_inference_scheduler

from ..data.ingest import data_dir
from ..data.manifest import read_manifest
from .lesion_inpaint import RadsynthLesionInpaintPipeline
from .mask_to_image import CONTROLNET_FOLDER, RadsynthMaskToImagePipeline
from .pairs import PairSource, SampleCondition, generated_condition, with_lesions
from .text_to_image import RadsynthTextToImagePipeline, model_hash
from .text_to_pair import MASK_GENERATOR_FOLDER, RadsynthTextToPairPipeline
from .writers import write_sample

# Settings that change what one sample looks like; batch size and sample count do not.
SEED_FIELDS = ("scheduler", "num_inference_steps", "guidance_scale")


@dataclass
class GenerateResult:
    sample_dir: Path
    written: list[str]
    skipped: int
    model_hash: str
    latent_std: float | None  # health check: ~1 for a sane sampler (training latents are scaled to std 1)


def load_pipeline(model_dir: str | Path, config: RadsynthConfig, progress: bool = True,
                  pairs: bool | None = None) -> RadsynthTextToImagePipeline:
    """The trained text-to-image pipeline; for pairs (default ``sampling.pairs``) the mask-to-image one (its
    ControlNet beside it), or with ``sampling.mask_source: generated`` the text-to-pair one."""
    model_dir = Path(model_dir)
    pairs = config.sampling.pairs if pairs is None else pairs
    if not progress:
        diffusers_logging.disable_progress_bar()
    if not (model_dir / "model_index.json").is_file():
        raise UserInputError(model_dir, "no trained model here", "run `radsynth train CONFIG` first")
    if pairs:
        generated = config.sampling.mask_source == "generated"
        needed, setting = ((MASK_GENERATOR_FOLDER, "mask_generator.enabled: true") if generated
                           else (CONTROLNET_FOLDER, "conditioning.use_masks: true"))
        if not (model_dir / needed).is_dir():
            raise UserInputError(model_dir, f"no {needed} in this model", f"train with {setting} to generate pairs")
        kind = (RadsynthTextToPairPipeline if generated else
                RadsynthLesionInpaintPipeline if config.sampling.inpaint else RadsynthMaskToImagePipeline)
        pipeline = kind.from_model_dir(model_dir)
    else:
        # low_cpu_mem_usage would build each component under accelerate's init_empty_weights, which patches
        # torch.nn.Module for the whole process: shards sampling on threads then race, and a module created in
        # one thread while another loads lands on the meta device. Our models are small; load them plainly.
        pipeline = RadsynthTextToImagePipeline.from_pretrained(model_dir, use_safetensors=True,
                                                               low_cpu_mem_usage=False)
    pipeline.scheduler = build_inference_scheduler(config.diffusion.objective, config.sampling.scheduler,
                                                   config.diffusion.num_train_timesteps)
    device = "cuda" if config.runtime.device in ("auto", "cuda") and torch.cuda.is_available() else (
        "cpu" if config.runtime.device == "auto" else config.runtime.device)
    return pipeline.to(device)


def sample_seed(digest: str, config: RadsynthConfig, index: int) -> int:
    settings = {field: getattr(config.sampling, field) for field in SEED_FIELDS}
    if config.sampling.lesions:  # they change a pair; absent, seeds stay those of earlier releases
        settings["lesions"] = list(config.sampling.lesions)
    if config.sampling.pairs and config.sampling.mask_source != "bank":
        settings["mask_source"] = config.sampling.mask_source
    if config.sampling.inpaint:
        settings["inpaint_margin"] = config.sampling.inpaint_margin
    key = json.dumps({"model": digest, "seed": config.runtime.seed, **settings, "index": index}, sort_keys=True)
    return int(hashlib.sha256(key.encode()).hexdigest()[:15], 16)


def sampling_prompts(config: RadsynthConfig) -> list[str]:
    """The configured prompts, or else the prompts of the test split (conditions of real, unseen cases)."""
    if config.sampling.prompts:
        return list(config.sampling.prompts)
    records = read_manifest(data_dir(config) / "manifest.jsonl")
    conditioning = ConditioningSpec(config.conditioning.attributes, config.conditioning.include_text)
    prompts = [conditioning.prompt(record) for record in records if record.split == "test"]
    if not prompts:
        raise UserInputError("sampling.prompts", "no prompts and an empty test split", "give sampling.prompts")
    return prompts


def generate(config: RadsynthConfig, model_dir: str | Path, n_samples: int, sample_dir: str | Path,
             prompts: list[str] | None = None, progress: bool = True,
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
        prompts = [with_lesions(prompt, sampling.lesions) for prompt in prompts or sampling_prompts(config)]
    sample_dir = Path(sample_dir)
    fmt = config.sampling.output_format
    if fmt == "auto":
        fmt = "png16" if pipeline.config.spatial_dims == 2 else "nifti"

    wanted = range(n_samples) if indices is None else indices
    todo = [i for i in wanted if not _done(sample_dir, i, sample_seed(digest, config, i), digest)]
    written, latent_stds = [], []
    batch = config.sampling.batch_size
    for start in tqdm(range(0, len(todo), batch), desc="generate", unit="batch", disable=None if progress else True):
        indices = todo[start:start + batch]
        seeds = [sample_seed(digest, config, i) for i in indices]
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        if bank is not None:
            drawn = [bank.draw(seed) for seed in seeds]
        else:
            drawn = [SampleCondition(prompts[i % len(prompts)], None, {"derived_from_real": False}) for i in indices]
        output = pipeline([pair.prompt for pair in drawn], num_inference_steps=sampling.num_inference_steps,
                          guidance_scale=sampling.guidance_scale, generator=generators, output_type="physical",
                          **_pair_inputs(drawn, config))
        if getattr(output, "mask_sources", None):  # the maps were generated: their conditions come with them
            drawn = [generated_condition(pair.prompt, label_map[0], edits, pipeline.mask_generator.label_vocabulary)
                     for pair, label_map, edits in zip(drawn, output.label_maps, output.lesions)]
        latent_stds.append(output.latent_std)
        for index, seed, pair, image in zip(indices, seeds, drawn, np.asarray(output.images)):
            sidecar = {"prompt": pair.prompt, "seed": seed, "scheduler": config.sampling.scheduler,
                       "num_inference_steps": config.sampling.num_inference_steps,
                       "guidance_scale": config.sampling.guidance_scale, "model_hash": digest, "sample_index": index,
                       "modality": pipeline.config.modality, **pair.sidecar}
            write_sample(sample_dir, sample_id(index), image[0], _affine(pipeline), fmt, sidecar,
                         png_range=(pipeline.config.intensity_low, pipeline.config.intensity_high),
                         label=pair.label_map)
            written.append(sample_id(index))
    return GenerateResult(sample_dir, written, len(wanted) - len(todo), digest,
                          float(np.mean(latent_stds)) if latent_stds else None)


def _pair_inputs(drawn: list[SampleCondition], config: RadsynthConfig) -> dict:
    """The pipeline's arguments for pairs: lesion requests for generated maps; otherwise the drawn maps, and for
    inpainting the real images and the regions to generate."""
    sampling = config.sampling
    if not sampling.pairs:
        return {}
    inputs = {"conditioning_scale": config.controlnet.conditioning_scale}
    if sampling.mask_source == "generated":
        return {**inputs, "lesions": sampling.lesions}
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

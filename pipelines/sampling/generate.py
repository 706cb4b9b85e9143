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
from .mask_to_image import CONTROLNET_FOLDER, RadsynthMaskToImagePipeline
from .pairs import PairSource, SampleCondition
from .text_to_image import RadsynthTextToImagePipeline, model_hash
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
                  masks: bool = False) -> RadsynthTextToImagePipeline:
    """The trained text-to-image pipeline, or with ``masks`` the mask-to-image one (its ControlNet beside it)."""
    model_dir = Path(model_dir)
    if not progress:
        diffusers_logging.disable_progress_bar()
    if not (model_dir / "model_index.json").is_file():
        raise UserInputError(model_dir, "no trained model here", "run `radsynth train CONFIG` first")
    if masks:
        if not (model_dir / CONTROLNET_FOLDER).is_dir():
            raise UserInputError(model_dir, "no mask ControlNet in this model",
                                 "train with conditioning.use_masks: true to generate pairs")
        pipeline = RadsynthMaskToImagePipeline.from_model_dir(model_dir)
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
             indices: Sequence[int] | None = None, pairs: bool = False) -> GenerateResult:
    """Samples 0..n_samples-1, or only ``indices`` of them (one shard of a fanned-out run).

    pairs: image + label-map pairs from the mask-to-image model, each mask drawn from the bank and edited by
    ``sampling.lesions`` (see ``pairs.PairSource``); the label is written on the image's grid.
    """
    pipeline = load_pipeline(model_dir, config, progress, masks=pairs)
    pipeline.set_progress_bar_config(disable=True)
    digest = model_hash(pipeline)
    conditions = PairSource(config) if pairs else None
    prompts = None if pairs else prompts or sampling_prompts(config)
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
        if conditions is None:
            drawn = [SampleCondition(prompts[i % len(prompts)], None, {"derived_from_real": False}) for i in indices]
            masks = {}
        else:
            drawn = [conditions.draw(seed) for seed in seeds]
            masks = {"label_maps": np.stack([pair.label_map[None] for pair in drawn]),
                     "conditioning_scale": config.controlnet.conditioning_scale}
        output = pipeline([pair.prompt for pair in drawn], num_inference_steps=config.sampling.num_inference_steps,
                          guidance_scale=config.sampling.guidance_scale, generator=generators, output_type="physical",
                          **masks)
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

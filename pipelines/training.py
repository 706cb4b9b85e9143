"""The train stage: autoencoder -> latent scale -> latents cached once -> diffusion backbone -> saved pipeline.

Plain Python over the data stage's manifest and cache. Each part resumes from its own checkpoints, and a
part whose final weights exist is loaded instead of retrained, so ``radsynth train`` can be killed and rerun.
Each part's folder is stamped with a fingerprint of what it was trained from (its config section, the data
manifest, seed, precision, and the parts upstream of it): a part whose fingerprint changed starts over, so
a rerun after a config change redoes what changed and nothing else.
The result is a diffusers-style folder (``model_index.json``, one folder per component with ``config.json``
and safetensors) with a model card, that ``RadsynthTextToImagePipeline.from_pretrained`` rebuilds.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState

from radsynth.configs import RadsynthConfig, UserInputError
from radsynth.configs.schema import pooled_modality
from radsynth.generators.augmentation import LatentAugment
from radsynth.generators.autoencoder import RadsynthAutoencoder
from radsynth.generators.autoencoder_trainer import (
    AutoencoderTrainer,
    calibrate_scaling_factor,
    holdout_reconstruction,
)
from radsynth.generators.compute import resolve_precision
from radsynth.generators.controlnet import ControlLossWeights, RadsynthControlNet, rare_labels
from radsynth.generators.data import CachedImages, CachedLatents, ConditioningSpec, balance_weights
from radsynth.generators.diffusion_trainer import DiffusionTrainer
from radsynth.generators.latent_diffusion import LatentDiffusion
from radsynth.generators.losses import AutoencoderLoss
from radsynth.generators.mask_generator import LabelLossWeights, RadsynthMaskGenerator
from radsynth.generators.objectives import TrainingObjective, build_inference_scheduler
from radsynth.generators.text_encoder import load_text_encoder
from radsynth.generators.trainer import LoopSettings
from radsynth.generators.unet import RadsynthUNet

from .data.ingest import data_dir
from .data.io import write_json
from .data.manifest import CaseRecord, read_manifest
from .masks import MaskBank
from .model_card import write_model_card, write_training_compute
from .sampling.grids import save_grid
from .sampling.mask_to_image import RadsynthMaskToImagePipeline
from .sampling.pipeline import CONTROLNET_FOLDER, MASK_GENERATOR_FOLDER, RadsynthPipeline, model_hash
from .sampling.text_to_image import RadsynthTextToImagePipeline
from .sampling.text_to_pair import mask_generator_diffusion
from .scoring.mask_probe import MaskAdherenceProbe
from .training_frontier import Frontier

AUTOENCODER_DIR, DIFFUSION_DIR, MODEL_DIR, STUDENT_DIR = "autoencoder", "diffusion", "model", "model-student"
LATENT_CLIP = 3.0  # sampling clips the implied clean latents at about 3 latent SD (DESIGN: measured pitfalls)
# Fields that say how long a run goes and how often it logs, checkpoints or validates: changing them keeps a
# part's training (a larger max_steps resumes from the last checkpoint instead of starting over).
BOOKKEEPING_FIELDS = {"max_steps", "max_minutes", "checkpoint_every", "validate_every", "log_every", "keep_checkpoints",
                      "validation_cases", "segmenter_steps"}


@dataclass
class TrainResult:
    model_dir: Path
    model_hash: str
    autoencoder_holdout: dict[str, float]
    scaling_factor: float
    diffusion_steps: int
    resumed_from: int


def train_dir(config: RadsynthConfig) -> Path:
    return config.output_dir / "train"


def model_dir(config: RadsynthConfig) -> Path:
    return config.output_dir / MODEL_DIR


def finetuned_model_dir(config: RadsynthConfig) -> Path:
    tag = "-".join(f"{key}-{value}" for key, value in sorted(config.finetune.filter.items())) or "all"
    private = config.finetune.privacy
    name = f"model-finetune-{config.finetune.method}-{tag}" + (f"-dp-eps{private.epsilon:g}" if private.enabled else "")
    return config.output_dir / re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def trained_model_dir(config: RadsynthConfig) -> Path:
    """What ``radsynth train`` writes: the fine-tuned model when ``finetune.from`` is set, else the trained one."""
    return finetuned_model_dir(config) if config.finetune.from_ else model_dir(config)


def student_dir(config: RadsynthConfig) -> Path:
    """What ``radsynth distill`` writes: the few-step student of the trained model."""
    return config.output_dir / STUDENT_DIR


def sampling_model_dir(config: RadsynthConfig) -> Path:
    """The model samples come from (and are scored and released with): the student with ``sampling.student``."""
    return student_dir(config) if config.sampling.student else trained_model_dir(config)


def train(config: RadsynthConfig, progress: bool = True) -> TrainResult:
    config.check_trainable()
    records, summary = ingested_dataset(config)
    if config.diffusion.frontier_every:  # it scores against every real split: refuse now, not after the autoencoder
        for split in ("holdout", "test"):
            split_cases(records, split)
    cache_dir = Path(summary["cache"])
    conditioning = ConditioningSpec(config.conditioning.attributes, config.conditioning.include_text)
    train_images = CachedImages(split_cases(records, "train"), cache_dir, conditioning)
    intensity = summary["intensity_train"]
    data_stamp = _file_sha256(Path(summary["manifest"])) + json.dumps(config.data.preprocess.model_dump(mode="json"))
    autoencoder_stamp = part_fingerprint(config, "autoencoder", upstream=data_stamp)
    start_over_if_changed(train_dir(config), autoencoder_stamp)  # the latents and the diffusion part go with it

    autoencoder, holdout = _autoencoder(config, train_images, records, cache_dir, conditioning, intensity, progress)
    latents = cached_latents(autoencoder, train_images, train_dir(config) / "latents.safetensors",
                              config.autoencoder.batch_size)
    class_names = class_vocabulary(train_images.records, config.conditioning.class_attribute)
    latents.class_labels = class_labels(train_images.records, config.conditioning.class_attribute, class_names)
    maps_in_unet = config.conditioning.use_masks and config.conditioning.mask_input == "concat"
    map_labels, loss_weights = 0, None
    if maps_in_unet:  # the UNet learns the maps with everything else
        latents.label_maps = train_images.label_maps()
        map_labels = max(label_vocabulary(train_images.records)) + 1
        if config.diffusion.rare_label_weight:
            loss_weights = ControlLossWeights(rare_labels(latents.label_maps, map_labels),
                                              config.diffusion.rare_label_weight, autoencoder.downsample_factor)
    if config.diffusion.balance_by:
        latents.row_weights = balance_weights(train_images.records, config.diffusion.balance_by)

    torch.manual_seed(config.runtime.seed + 1)  # initial weights do not depend on whether the autoencoder was loaded
    text_encoder = load_text_encoder(
        config.conditioning.text_encoder, config.conditioning.pretrained_path, captions=train_images.prompts,
        max_length=config.conditioning.max_tokens, embed_dim=config.conditioning.embed_dim,
        num_layers=config.conditioning.text_layers, num_heads=config.conditioning.text_heads,
        min_cases=config.conditioning.min_word_cases)
    # Masks condition a ControlNet beside the diffusion model, not the model itself, unless the UNet reads them
    # (mask_input: concat, which implies use_masks). The text encoder's vocabulary is part of what it learns from: a
    # model on another vocabulary starts over (its embedding would not load).
    vocabulary = json.dumps(text_encoder.config.get("vocab", []))
    start_over_if_changed(train_dir(config) / DIFFUSION_DIR, part_fingerprint(
        config, "diffusion", upstream=autoencoder_stamp + hashlib.sha256(vocabulary.encode()).hexdigest(),
        also=("conditioning",), ignore=("use_masks",) if maps_in_unet else ("use_masks", "mask_dropout")))
    unet = _unet(config, autoencoder, text_encoder.embed_dim, len(class_names) + 1 if class_names else None,
                 map_labels)
    diffusion = config.diffusion
    core = LatentDiffusion(unet, autoencoder, text_encoder,
                           TrainingObjective(diffusion.objective, diffusion.num_train_timesteps,
                                             min_snr_gamma=diffusion.min_snr_gamma),
                           class_attribute=config.conditioning.class_attribute, class_names=class_names,
                           loss_weights=loss_weights)
    # The default text encoder learns with the UNet; a pretrained one stays frozen.
    trained = [unet, text_encoder] if any(p.requires_grad for p in text_encoder.parameters()) else [unet]
    # One callback serves the validation grid and the frontier: it is called at the steps either asks for.
    every = math.gcd(diffusion.validate_every, diffusion.frontier_every or diffusion.validate_every)
    trainer = _trainer(config, core, trained, latents, train_dir(config) / DIFFUSION_DIR,
                       loop_settings(config, progress, validate_every=every),
                       diffusion.learning_rate, diffusion.batch_size, augment=latent_augment(config),
                       map_dropout=config.conditioning.mask_dropout if maps_in_unet else 0.0)

    def pipeline_now() -> RadsynthTextToImagePipeline:
        unwrap = trainer.loop.accelerator.unwrap_model
        return _pipeline(config, unwrap(core.denoiser), autoencoder, unwrap(core.text_encoder), summary, latents,
                         class_names)

    validation_prompts = _validation_prompts(records, conditioning)

    frontier = (Frontier(config, train_dir(config) / DIFFUSION_DIR, train_images.prompts, trainer)
                if diffusion.frontier_every and trainer.loop.accelerator.is_main_process else None)

    def validate(step: int) -> dict[str, float] | None:
        if not trainer.loop.accelerator.is_main_process:
            return None
        last, logs = trainer.loop.at_last_step, {}
        with trainer.inference_weights():
            if step % diffusion.validate_every == 0 or last:
                logs |= _validation_grid(pipeline_now(), validation_prompts, config,
                                         train_dir(config) / DIFFUSION_DIR / "samples" / f"step-{step:07d}.png")
            if frontier is not None and (step % diffusion.frontier_every == 0 or last):
                logs |= frontier.add(step, pipeline_now())
        return logs

    resumed_from = trainer.fit(validate)
    accelerator = trainer.loop.accelerator
    with trainer.inference_weights():
        chosen = frontier.keep_chosen() if frontier is not None else None
        pipeline = pipeline_now()
        digest = model_hash(pipeline)  # of the saved (EMA) weights, before the training weights come back
        if accelerator.is_main_process:  # under `accelerate launch` every process holds the same weights
            save_pipeline(pipeline, model_dir(config))
            write_model_card(model_dir(config), config, records, summary, holdout, digest, trainer.loop.state.step,
                             frontier=None if frontier is None else frontier.summary(chosen))
    accelerator.wait_for_everyone()
    parts = [AUTOENCODER_DIR, DIFFUSION_DIR]
    if config.conditioning.use_masks:
        validation = None if maps_in_unet else controlnet_validation(config, records, cache_dir)
        _mask_models(config, train_images, validation, latents, digest, progress)
        parts += [] if maps_in_unet else [CONTROLNET_FOLDER]
        parts += [MASK_GENERATOR_FOLDER] if config.mask_generator.enabled else []
    out = model_dir(config)
    if accelerator.is_main_process:
        write_training_compute(out, {part: train_dir(config) / part for part in parts})
    return TrainResult(out, digest, holdout, autoencoder.scaling_factor, trainer.loop.state.step, resumed_from)


# ----------------------------------------------------------------------------------------------- parts


def ingested_dataset(config: RadsynthConfig) -> tuple[list[CaseRecord], dict]:
    manifest, summary = data_dir(config) / "manifest.jsonl", data_dir(config) / "summary.json"
    if not summary.is_file():
        raise UserInputError(manifest, "no ingested dataset", "run `radsynth ingest CONFIG` first")
    return read_manifest(manifest), json.loads(summary.read_text())


def part_fingerprint(config: RadsynthConfig, section: str, upstream: str, also: tuple[str, ...] = (),
                     ignore: tuple[str, ...] = ()) -> str:
    """What a training part learns from: its config ``section`` (a dotted name for a nested one), the ``also``
    sections, ``upstream`` (what it was trained on). Only settings that differ from their defaults count, so a new
    release that adds a setting (at its default) keeps everyone's training instead of starting it over."""
    settings = {name: _differing_from_defaults(_section(config, name)) for name in (section, *also)}
    settings = {name: {k: v for k, v in values.items() if k not in ignore} for name, values in settings.items()}
    settings[section] = {k: v for k, v in settings[section].items() if k not in BOOKKEEPING_FIELDS}
    # The precision it trained in, not the setting: "auto" means fp32 on one machine and bf16 on another.
    key = {"upstream": upstream, "seed": config.runtime.seed, "precision": training_precision(config), **settings}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _section(config: RadsynthConfig, name: str):
    """A config section by its dotted name ("diffusion", "translation.cycle_gan")."""
    for part in name.split("."):
        config = getattr(config, part)
    return config


def training_precision(config: RadsynthConfig) -> str:
    """The mixed precision every training part runs in ("no", "bf16" or "fp16"; "auto" resolved for this machine)."""
    return resolve_precision(config.runtime.precision, config.runtime.device, config.data.spatial_dims)


def _differing_from_defaults(section) -> dict:
    values, defaults = section.model_dump(mode="json"), type(section)().model_dump(mode="json")
    return {key: value for key, value in values.items() if key not in defaults or defaults[key] != value}


def start_over_if_changed(folder: Path, fingerprint: str) -> None:
    """Empty ``folder`` when it was trained from something else; then stamp it with ``fingerprint``.

    A folder from before stamps existed is adopted as it is rather than deleted.
    """
    stamp = folder / "fingerprint.json"
    state = PartialState()
    if state.is_main_process:
        if stamp.is_file() and json.loads(stamp.read_text())["fingerprint"] != fingerprint:
            shutil.rmtree(folder)
        write_json(stamp, {"fingerprint": fingerprint})
    state.wait_for_everyone()


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def split_cases(records: list[CaseRecord], split: str) -> list[CaseRecord]:
    chosen = [record for record in records if record.split == split]
    if not chosen:
        raise UserInputError(f"data.split.{split}", f"the {split} split is empty",
                             "a non-zero fraction, over at least one source that is not train_only")
    return chosen


def loop_settings(config: RadsynthConfig, progress: bool, part=None, *,
                  validate_every: int | None = None) -> LoopSettings:
    """The loop of one training part: its section's steps, time budget and checkpoint interval (``part``, default
    the diffusion section; a fine-tune has no interval of its own and takes the diffusion section's)."""
    diffusion = config.diffusion
    part = part or diffusion
    return LoopSettings(
        max_steps=part.max_steps, max_minutes=part.max_minutes,
        checkpoint_every=getattr(part, "checkpoint_every", diffusion.checkpoint_every),
        keep_checkpoints=diffusion.keep_checkpoints, log_every=diffusion.log_every, validate_every=validate_every,
        gradient_accumulation_steps=diffusion.gradient_accumulation_steps,
        mixed_precision=training_precision(config), device=config.runtime.device, progress=progress,
        tensorboard=config.runtime.tensorboard)


def _trainer(config: RadsynthConfig, core: LatentDiffusion, trained: list[torch.nn.Module], data: CachedLatents,
             folder: Path, loop: LoopSettings, learning_rate: float, batch_size: int,
             augment: LatentAugment | None = None, map_dropout: float = 0.0) -> DiffusionTrainer:
    """A trainer of ``trained`` (parts of ``core``) with the diffusion section's schedule, clipping, EMA and dropout
    (``map_dropout``: of the label maps, for a UNet that reads them)."""
    diffusion = config.diffusion
    return DiffusionTrainer(core, trained, data, folder, loop, learning_rate=learning_rate,
                            lr_schedule=diffusion.lr_schedule, warmup_steps=diffusion.warmup_steps,
                            batch_size=batch_size, condition_dropout=config.conditioning.condition_dropout,
                            text_dropout=config.conditioning.text_dropout, max_grad_norm=diffusion.max_grad_norm,
                            ema_decay=diffusion.ema_decay, seed=config.runtime.seed, map_dropout=map_dropout,
                            augment=augment)


def latent_augment(config: RadsynthConfig) -> LatentAugment | None:
    """The diffusion model's augmentation of its training latents (``diffusion.augment``), or None when off."""
    settings = config.diffusion.augment
    if not settings.probability:
        return None
    return LatentAugment(settings.probability, flip=settings.flip, rotate=settings.rotate,
                         max_shift=settings.max_shift)


def _autoencoder(config, train_images, records, cache_dir, conditioning, intensity, progress):
    """Trained (or loaded, when its final folder exists) autoencoder with its latent scale, and holdout metrics."""
    final = train_dir(config) / AUTOENCODER_DIR / "final"
    metrics_path = final / "holdout_metrics.json"
    if (final / "config.json").is_file() and metrics_path.is_file():
        return RadsynthAutoencoder.from_pretrained(final, use_safetensors=True), json.loads(metrics_path.read_text())
    settings = config.autoencoder
    torch.manual_seed(config.runtime.seed)
    autoencoder = RadsynthAutoencoder(
        spatial_dims=config.data.spatial_dims, channels=tuple(settings.channels),
        latent_channels=settings.latent_channels, num_res_blocks=settings.num_res_blocks,
        attention_levels=tuple(settings.attention_levels), norm_num_groups=settings.norm_num_groups)
    loss = AutoencoderLoss(settings.kl_weight, settings.adversarial_weight, config.data.spatial_dims)
    loop = loop_settings(config, progress, settings)
    loop.gradient_accumulation_steps = 1
    trainer = AutoencoderTrainer(autoencoder, loss, train_images, train_dir(config) / AUTOENCODER_DIR, loop,
                                 settings.learning_rate, settings.batch_size, config.runtime.seed,
                                 config.diffusion.max_grad_norm)
    autoencoder = trainer.fit()
    calibrate_scaling_factor(autoencoder, train_images, settings.batch_size)
    held_out = [record for record in records if record.split == "holdout"]
    # A base pretrained on train-only sources alone (MedNIST: no patient ids) has no holdout to measure on.
    holdout = holdout_reconstruction(autoencoder, CachedImages(held_out, cache_dir, conditioning), settings.batch_size,
                                     intensity["low"], intensity["high"]) if held_out else {}
    if trainer.loop.accelerator.is_main_process:
        save_atomically(lambda folder: autoencoder.save_pretrained(folder, safe_serialization=True), final)
        write_json(final / "holdout_metrics.json", holdout)
    trainer.loop.accelerator.wait_for_everyone()
    return autoencoder, holdout


def _mask_models(config: RadsynthConfig, train_images: CachedImages, validation: CachedImages | None,
                 latents: CachedLatents, base_hash: str, progress: bool) -> None:
    """The models beside the saved (frozen) base that make pairs: the ControlNet (unless the UNet reads the maps
    itself), and the mask generator when enabled. Each trains on the training label maps and is saved into the
    model folder. ``validation``: the held-out cases whose maps the ControlNet's validation generates from."""
    base = RadsynthTextToImagePipeline.from_model_dir(model_dir(config))
    if latents.label_maps is None:  # a UNet that reads maps has them already
        latents.label_maps = train_images.label_maps()
    label_names = label_vocabulary(train_images.records)
    if config.conditioning.mask_input == "controlnet":
        torch.manual_seed(config.runtime.seed + 2)
        controlnet = RadsynthControlNet.from_unet(base.unet, max(label_names) + 1, base.vae.downsample_factor)
        fit_controlnet(config, base, controlnet, latents, train_dir(config) / CONTROLNET_FOLDER, model_dir(config),
                       base_hash, controlnet_probe(config, train_images, latents, validation, label_names), progress)
    if config.mask_generator.enabled:
        _mask_generator(config, base, latents, label_names, base_hash, progress)


def label_vocabulary(records: list[CaseRecord]) -> dict[int, str]:
    """Every label value the cases' maps use, with its name."""
    label_names: dict[int, str] = {}
    for record in records:
        label_names.update(record.label_names)
    return label_names


def controlnet_validation(config: RadsynthConfig, records: list[CaseRecord], cache_dir: Path) -> CachedImages | None:
    """The held-out (test split) cases whose maps a ControlNet's validation draws images from, or None."""
    held_out = [record for record in records if record.split == "test"][: config.controlnet.validation_cases]
    conditioning = ConditioningSpec(config.conditioning.attributes, config.conditioning.include_text)
    return CachedImages(held_out, cache_dir, conditioning) if held_out else None


def controlnet_probe(config: RadsynthConfig, train_images: CachedImages, latents: CachedLatents,
                     validation: CachedImages | None, label_names: dict[int, str]
                     ) -> Callable[[], MaskAdherenceProbe] | None:
    """The Dice probe of a ControlNet's validations (None when off): a segmenter trained on the training images
    and ``latents.label_maps``, built at the first validation, so a rerun whose ControlNet is already trained
    never trains a segmenter."""
    if not config.controlnet.validate_every or validation is None:
        return None
    everything = range(len(train_images))
    return functools.cache(lambda: MaskAdherenceProbe.fit(
        train_images.images(everything)[:, 0].numpy(), latents.label_maps[:, 0].numpy(),
        validation.images(range(len(validation)))[:, 0].numpy(), validation.label_maps()[:, 0].numpy(),
        validation.prompts, label_names, segmenter_steps=config.controlnet.segmenter_steps,
        seed=config.runtime.seed, num_inference_steps=min(config.sampling.num_inference_steps, 50),
        batch_size=config.sampling.batch_size, **config.sampling.guidance))


def fit_controlnet(config: RadsynthConfig, base: RadsynthPipeline, controlnet: torch.nn.Module,
                   latents: CachedLatents, folder: Path, out: Path, base_hash: str,
                   probe: Callable[[], MaskAdherenceProbe] | None, progress: bool) -> int:
    """Train ``controlnet`` beside the frozen ``base`` on ``latents.label_maps`` (checkpoints in ``folder``),
    logging ``probe``'s Dice at each validation; save it as the ``mask_controlnet`` of the model folder ``out``.
    Returns its steps."""
    start_over_if_changed(folder, part_fingerprint(config, "controlnet", upstream=base_hash))
    settings = config.controlnet
    weights = (ControlLossWeights(rare_labels(latents.label_maps, controlnet.num_labels), settings.rare_label_weight,
                                  base.vae.downsample_factor) if settings.rare_label_weight else None)
    diffusion = base.diffusion(controlnet, settings.conditioning_scale, weights)
    trainer = _trainer(config, diffusion, [controlnet], latents, folder,
                       loop_settings(config, progress, settings, validate_every=settings.validate_every),
                       settings.learning_rate, settings.batch_size)

    def validate(step: int) -> dict[str, float] | None:
        if not trainer.loop.accelerator.is_main_process:
            return None
        with trainer.inference_weights() as (trained,):
            return probe()(RadsynthMaskToImagePipeline.from_pipe(base, mask_controlnet=trained))

    trainer.fit(validate if probe else None)
    with trainer.inference_weights() as (trained,):
        if trainer.loop.accelerator.is_main_process:
            save_atomically(lambda partial: trained.save_pretrained(partial, safe_serialization=True),
                             out / CONTROLNET_FOLDER)
    trainer.loop.accelerator.wait_for_everyone()
    return trainer.loop.state.step


def _mask_generator(config: RadsynthConfig, base: RadsynthPipeline, latents: CachedLatents,
                    label_names: dict[int, str], base_hash: str, progress: bool) -> int:
    """Train the mask generator on the training label maps under the base's frozen text encoder; save it as the
    model's ``mask_generator``. Returns its steps."""
    folder = train_dir(config) / MASK_GENERATOR_FOLDER
    settings, diffusion, unet_config = config.mask_generator, config.diffusion, base.unet.config
    # The loss weighting counts at its defaults too: mask generators trained before it existed drew no findings.
    weighting = f"label_balance={settings.label_balance},rare_label_weight={settings.rare_label_weight}"
    start_over_if_changed(folder, part_fingerprint(config, "mask_generator", upstream=f"{base_hash}/{weighting}"))
    torch.manual_seed(config.runtime.seed + 3)
    generator = RadsynthMaskGenerator(
        label_names={str(value): name for value, name in sorted(label_names.items())},
        image_shape=tuple(base.config.image_shape), downsample=settings.downsample,
        smoothing_sigma=settings.smoothing_sigma, spatial_dims=config.data.spatial_dims,
        channels=tuple(settings.channels), attention_levels=tuple(settings.attention_levels),
        num_head_channels=diffusion.num_head_channels, cross_attention_dim=unet_config.cross_attention_dim,
        norm_num_groups=settings.norm_num_groups, num_class_embeds=unet_config.num_class_embeds,
        use_spacing=unet_config.use_spacing, orientation=asdict(MaskBank.from_ingest(config).grid_orientation))
    shares = torch.cat([generator.encode(latents.label_maps[start:start + 64])
                        for start in range(0, len(latents), 64)])
    maps = latents.with_values(shares, torch.zeros_like(shares))
    weights = LabelLossWeights.from_shares(shares, settings.label_balance, settings.rare_label_weight)
    trainer = _trainer(config, mask_generator_diffusion(base, generator, weights), [generator], maps, folder,
                       loop_settings(config, progress, settings),
                       settings.learning_rate, settings.batch_size)
    trainer.fit()
    with trainer.inference_weights() as (trained,):
        if trainer.loop.accelerator.is_main_process:
            save_atomically(lambda partial: trained.save_pretrained(partial, safe_serialization=True),
                             model_dir(config) / MASK_GENERATOR_FOLDER)
    trainer.loop.accelerator.wait_for_everyone()
    return trainer.loop.state.step


@torch.no_grad()
def cached_latents(autoencoder: RadsynthAutoencoder, images: CachedImages, path: Path,
                   batch_size: int) -> CachedLatents:
    """Posterior mean and std of every training image, encoded once (reused while the autoencoder is the same).
    Under a launch the main process encodes and writes them; the others, holding the same autoencoder, read them."""
    with PartialState().main_process_first():
        return _cached_latents(autoencoder, images, path, batch_size)


def _cached_latents(autoencoder: RadsynthAutoencoder, images: CachedImages, path: Path,
                    batch_size: int) -> CachedLatents:
    stamp = path.with_suffix(".json")
    identity = {"scaling_factor": autoencoder.scaling_factor, "cases": [r.case_id for r in images.records]}
    if path.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == identity:
        return CachedLatents.load(path, images)
    autoencoder.eval()
    mus, sigmas = [], []
    for start in range(0, len(images), batch_size):
        x = images.images(range(start, min(start + batch_size, len(images)))).to(autoencoder.device)
        z_mu, z_sigma = autoencoder.posterior(x)
        mus.append(z_mu.cpu())
        sigmas.append(z_sigma.cpu())
    latents = CachedLatents.of(images, torch.cat(mus), torch.cat(sigmas))
    latents.save(path)
    write_json(stamp, identity)
    return latents


def class_vocabulary(records: list[CaseRecord], attribute: str | None) -> list[str]:
    """The values of the class attribute seen in training; index 0 is kept for 'none' (the null class)."""
    if not attribute:
        return []
    return sorted({str(r.attributes[attribute]) for r in records if r.attributes.get(attribute) not in (None, "")})


def class_labels(records: list[CaseRecord], attribute: str | None, names: list[str]) -> torch.Tensor | None:
    if not names:
        return None
    values = [str(r.attributes.get(attribute)) for r in records]
    return torch.tensor([names.index(v) + 1 if v in names else 0 for v in values])


def _unet(config: RadsynthConfig, autoencoder: RadsynthAutoencoder, context_dim: int,
          num_class_embeds: int | None, label_channels: int = 0) -> RadsynthUNet:
    settings = config.diffusion
    latent_channels = autoencoder.config.latent_channels
    return RadsynthUNet(
        spatial_dims=config.data.spatial_dims, in_channels=latent_channels, out_channels=latent_channels,
        channels=tuple(settings.channels), attention_levels=tuple(settings.attention_levels),
        num_res_blocks=settings.num_res_blocks, num_head_channels=settings.num_head_channels,
        cross_attention_dim=context_dim, norm_num_groups=settings.norm_num_groups, num_class_embeds=num_class_embeds,
        use_spacing=config.data.spatial_dims == 3,
        augment_dims=LatentAugment.label_dims(config.data.spatial_dims) if latent_augment(config) else 0,
        label_channels=label_channels)


def _pipeline(config, unet, autoencoder, text_encoder, summary, latents: CachedLatents,
              class_names: list[str]) -> RadsynthTextToImagePipeline:
    scheduler = build_inference_scheduler(config.diffusion.objective, config.sampling.scheduler,
                                          config.diffusion.num_train_timesteps)
    return RadsynthTextToImagePipeline(
        unet=unet, vae=autoencoder, text_encoder=text_encoder, scheduler=scheduler,
        **image_space(config, summary, latents.spacing), latent_clip=LATENT_CLIP,
        class_attribute=config.conditioning.class_attribute if class_names else None, class_names=class_names,
        objective=config.diffusion.objective, num_train_timesteps=config.diffusion.num_train_timesteps)


def image_space(config: RadsynthConfig, summary: dict, spacings: torch.Tensor) -> dict:
    """The pipeline settings that describe the ingested data: modality, grid, spacing (the training cases'
    median) and the intensity range that "physical" output maps [-1, 1] back to."""
    intensity = summary["intensity_train"]
    # With no normalisation, [-1, 1] maps to itself.
    low, high = (-1.0, 1.0) if intensity["mode"] == "none" else (intensity["low"], intensity["high"])
    return {"modality": pooled_modality(summary["modality"]), "spatial_dims": config.data.spatial_dims,
            "image_shape": tuple(summary["preprocessed_shape"]),
            "spacing": tuple(float(s) for s in spacings.median(dim=0).values.tolist()),
            "intensity_low": low, "intensity_high": high}


def _validation_prompts(records: list[CaseRecord], conditioning: ConditioningSpec, limit: int = 6) -> list[str]:
    """One prompt per value of the leading attribute (a finding), from the test split, rarest last."""
    cases = [r for r in records if r.split == "test"] or records
    key = next(iter(conditioning.attribute_keys), None)
    chosen: dict[str, CaseRecord] = {}
    for record in cases:
        chosen.setdefault(str(record.attributes.get(key)) if key else record.case_id, record)
    return [conditioning.prompt(record) for record in list(chosen.values())[:limit]]


@torch.no_grad()
def _validation_grid(pipeline, prompts: list[str], config: RadsynthConfig, path: Path, per_prompt: int = 4) -> dict:
    generator = torch.Generator().manual_seed(config.runtime.seed)
    pipeline.set_progress_bar_config(disable=True)  # the training bar already shows progress
    output = pipeline([p for p in prompts for _ in range(per_prompt)], num_inference_steps=min(
        config.sampling.num_inference_steps, 50), generator=generator, output_type="np", **config.sampling.guidance)
    save_grid(np.asarray(output["images"]), rows=len(prompts), path=path)
    return {"latent_std": float(output["latent_std"])}


def save_pipeline(pipeline: RadsynthTextToImagePipeline, folder: Path) -> Path:
    return save_atomically(lambda partial: pipeline.save_pretrained(partial, safe_serialization=True), folder)


def save_atomically(save, folder: Path) -> Path:
    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    save(partial)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    return folder

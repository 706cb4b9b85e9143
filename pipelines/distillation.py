"""The distill stage: a trained model folder -> a few-step student folder that generate and the build use.

``radsynth distill CONFIG`` reads the trained model (never writes it), distils its guided sampler into a student
UNet on the cached training latents (``generators.distillation``), and saves a complete model folder beside it:
the student UNet and its ``ConsistencyScheduler``, the base's autoencoder and text encoder, and the base's
ControlNet and mask generator, so pairs, lesion edits and inpainting work on top of the student.
``sampling.student: true`` samples with it. The folder is stamped with what it was distilled from (the base's
hash and the distill settings): a rerun with the same inputs loads it, a change starts over.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from radsynth.configs import RadsynthConfig, UserInputError
from radsynth.generators.consistency import ConsistencyScheduler
from radsynth.generators.data import CachedImages, ConditioningSpec
from radsynth.generators.distillation import ConsistencyDistiller
from radsynth.generators.trainer import LoopSettings

from .model_card import write_model_card, write_training_compute
from .sampling.pipeline import CONTROLNET_FOLDER, MASK_GENERATOR_FOLDER, model_hash
from .sampling.text_to_image import RadsynthTextToImagePipeline
from .training import (
    cached_latents,
    class_labels,
    ingested_dataset,
    loop_settings,
    part_fingerprint,
    save_pipeline,
    split_cases,
    start_over_if_changed,
    student_dir,
    train_dir,
    trained_model_dir,
)

DISTILL_DIR = "distill"


@dataclass
class DistillResult:
    model_dir: Path
    model_hash: str
    teacher_hash: str
    steps: int
    guidance_scale: float


def distill(config: RadsynthConfig, teacher_dir: str | Path | None = None, progress: bool = True) -> DistillResult:
    teacher_dir = Path(teacher_dir or trained_model_dir(config))
    if not (teacher_dir / "model_index.json").is_file():
        raise UserInputError(teacher_dir, "no trained model to distil", "run `radsynth train CONFIG` first")
    teacher = RadsynthTextToImagePipeline.from_model_dir(teacher_dir)
    if teacher.config.distilled_guidance_scale is not None:
        raise UserInputError(teacher_dir, "this model is already a distilled student", "distil the trained model")
    teacher_hash, settings = model_hash(teacher), config.distill
    run_dir = train_dir(config) / DISTILL_DIR
    start_over_if_changed(run_dir, part_fingerprint(config, "distill", upstream=teacher_hash))
    out = student_dir(config)
    guidance = settings.guidance_scale if settings.guidance_scale is not None else config.sampling.guidance_scale
    records, summary = ingested_dataset(config)
    train_records = split_cases(records, "train")
    conditioning = ConditioningSpec(config.conditioning.attributes, config.conditioning.include_text)
    latents = cached_latents(teacher.vae, CachedImages(train_records, summary["cache"], conditioning),
                             train_dir(config) / "latents.safetensors", config.autoencoder.batch_size)
    latents.class_labels = class_labels(train_records, teacher.config.class_attribute, list(teacher.config.class_names))
    scheduler = ConsistencyScheduler(objective=teacher.config.objective,
                                     num_train_timesteps=teacher.config.num_train_timesteps,
                                     teacher_steps=settings.teacher_steps,
                                     noise_schedule=teacher.config.noise_schedule)
    torch.manual_seed(config.runtime.seed + 4)
    distiller = ConsistencyDistiller(
        teacher.diffusion(), copy.deepcopy(teacher.unet), latents, scheduler, run_dir,
        _loop(config, progress), guidance_scale=guidance, learning_rate=settings.learning_rate,
        batch_size=settings.batch_size, target_decay=settings.target_decay,
        max_grad_norm=config.diffusion.max_grad_norm, warmup_steps=settings.warmup_steps, seed=config.runtime.seed,
        text_dropout=config.conditioning.text_dropout)
    distiller.fit()
    with distiller.inference_weights() as student_unet:
        # Distilled on the real training latents, outside any DP mechanism: a private teacher's guarantee does not
        # carry over to its student.
        student = RadsynthTextToImagePipeline.from_pipe(teacher, unet=student_unet, scheduler=scheduler,
                                                        distilled_guidance_scale=guidance, differential_privacy=None)
        digest = model_hash(student)
        if distiller.loop.accelerator.is_main_process:
            save_pipeline(student, out)
            for part in (CONTROLNET_FOLDER, MASK_GENERATOR_FOLDER):
                if (teacher_dir / part).is_dir():
                    shutil.copytree(teacher_dir / part, out / part, dirs_exist_ok=True)
            write_model_card(out, config, records, summary, {}, digest, distiller.loop.state.step,
                             distilled={"teacher_hash": teacher_hash, "method": settings.method,
                                        "steps": settings.steps, "teacher_steps": settings.teacher_steps,
                                        "guidance_scale": guidance})
            write_training_compute(out, {"distillation": run_dir}, inherited=teacher_dir)
    distiller.loop.accelerator.wait_for_everyone()
    return DistillResult(out, digest, teacher_hash, distiller.loop.state.step, guidance)


def _loop(config: RadsynthConfig, progress: bool) -> LoopSettings:
    settings = config.distill
    loop = loop_settings(config, progress, settings)
    loop.gradient_accumulation_steps = 1
    return loop


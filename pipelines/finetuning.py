"""The fine-tune stage: adapt a trained model to a subset (one rare finding, 5-50 cases), base left intact.

``radsynth train CONFIG finetune.from=runs/demo/model finetune.filter="{finding: pneumothorax}"`` reads the
base folder (never writes it), picks the train-split cases that match the filter, encodes them with the
base autoencoder, trains LoRA factors on the UNet's attention (``method: domain_embedding``: one vector added to
the timestep embedding; ``block_shifts``: that and each residual block's channel shift; ``full``: the whole UNet),
and saves a complete, self-contained pipeline folder next to the base one. With ``conditioning.use_masks`` a
ControlNet then trains beside the saved model on the cases' label maps (``bases.base_controlnet``: a MAISI base's
own, fine-tuned on the local vocabulary) and is saved into the folder, so pairs come from the fine-tune.

With ``finetune.privacy.epsilon`` the adapter trains by DP-SGD over patients (``generators.private_training``)
and the spent (epsilon, delta) is saved in the model's config, its card and every sample's sidecar. The rest of
the private path: the autoencoder and text encoder are the base's, frozen (their vocabulary and weights never see
the fine-tune patients, so the base must not have either); the latents are encoded inside the mechanism's input;
no checkpoint is chosen by looking at the data (the last step is saved); nothing else trains.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from radsynth.configs import RadsynthConfig, UserInputError
from radsynth.generators.data import CachedImages, ConditioningSpec
from radsynth.generators.diffusion_trainer import DiffusionTrainer
from radsynth.generators.domain_embedding import add_block_shifts, add_domain_embedding
from radsynth.generators.lora import add_lora, merge_lora
from radsynth.generators.maisi import MaisiControlNet
from radsynth.generators.private_training import PrivacyPlan, PrivateDiffusionTrainer, plan_privacy

from .bases import base_controlnet, base_format, load_base
from .data.manifest import CaseRecord, matches
from .model_card import write_model_card, write_training_compute
from .sampling.generate import load_pipeline
from .sampling.pipeline import CONTROLNET_FOLDER, model_hash
from .training import (
    cached_latents,
    class_labels,
    controlnet_probe,
    controlnet_validation,
    finetuned_model_dir,
    fit_controlnet,
    ingested_dataset,
    label_vocabulary,
    loop_settings,
    model_dir,
    save_pipeline,
    train_dir,
)


@dataclass
class FinetuneResult:
    model_dir: Path
    model_hash: str
    base_model_hash: str
    cases: int
    steps: int


def _run_key(config: RadsynthConfig, base_hash: str) -> str:
    """Checkpoints belong to one base model and one set of fine-tune settings: a run never resumes another's
    state (a different rank would not even load). ``max_steps`` is left out so a longer run continues, except
    under differential privacy: the noise is calibrated for it and for the patients per step (the sample rate),
    and a run resumed under other values would spend what neither plan accounts for."""
    private = config.finetune.privacy.enabled
    settings = config.finetune.model_dump(mode="json", exclude=None if private else {"max_steps"})
    if private:
        settings["patients_per_step"] = config.diffusion.batch_size
    return hashlib.sha256(json.dumps({"base": base_hash, **settings}, sort_keys=True).encode()).hexdigest()[:12]


def matching_cases(records: list[CaseRecord], filter: dict, limit: int) -> list[CaseRecord]:
    """Train-split cases with every filter value (``manifest.matches``), first ``limit``."""
    return [r for r in records if r.split == "train" and matches(r, filter)][:limit]


def finetune(config: RadsynthConfig, progress: bool = True) -> FinetuneResult:
    settings = config.finetune
    if not settings.from_:
        raise UserInputError("finetune.from", "missing", "the folder of a trained model")
    torch.manual_seed(config.runtime.seed)
    records, summary = ingested_dataset(config)
    subset = matching_cases(records, settings.filter, settings.max_cases)
    if not subset:
        raise UserInputError("finetune.filter", f"no train-split case matches {settings.filter}",
                             "values of modality, body_region or an attribute as they appear in the manifest, e.g. "
                             "{finding: pneumothorax}")
    plan = _privacy_plan(config, subset)  # before anything is encoded or trained
    conditioning = ConditioningSpec(config.conditioning.attributes, config.conditioning.include_text)
    images = CachedImages(subset, summary["cache"], conditioning)
    base = load_base(config, summary, subset, images.spacings, progress)
    base_hash = model_hash(base)
    controlnet = None
    if config.conditioning.use_masks:  # built before anything trains: a base or map it cannot take is refused now
        label_maps, label_names = images.label_maps(), label_vocabulary(subset)
        torch.manual_seed(config.runtime.seed + 2)
        controlnet = base_controlnet(config, base, label_names)
    run_dir = train_dir(config) / f"{finetuned_model_dir(config).name}-{_run_key(config, base_hash)}"
    latents = cached_latents(base.vae, images, run_dir / "latents.safetensors", config.autoencoder.batch_size)
    latents.class_labels = class_labels(subset, base.config.class_attribute, list(base.config.class_names))

    unet = base.unet  # the text encoder stays as it is: its vocabulary was fitted on the full dataset
    if settings.method == "lora":
        add_lora(unet, settings.rank, settings.alpha)
    elif settings.method == "domain_embedding":
        add_domain_embedding(unet)
    elif settings.method == "block_shifts":
        add_block_shifts(unet)
    else:
        unet.requires_grad_(True)
    unet.train()
    batch_size = min(config.diffusion.batch_size, len(subset))
    # The base's own objective, read from its folder: a fine-tune continues what the base learnt to predict.
    arguments = dict(learning_rate=settings.learning_rate, lr_schedule="constant", warmup_steps=0,
                     batch_size=batch_size, condition_dropout=config.conditioning.condition_dropout,
                     text_dropout=config.conditioning.text_dropout, max_grad_norm=config.diffusion.max_grad_norm,
                     ema_decay=None, seed=config.runtime.seed)
    loop = loop_settings(config, progress, settings)
    if plan is None:
        trainer = DiffusionTrainer(base.diffusion(), [unet], latents, run_dir, loop, **arguments)
    else:
        trainer = PrivateDiffusionTrainer(base.diffusion(), [unet], latents, run_dir, loop, **arguments, plan=plan,
                                          patient_of_row=[record.patient_id for record in subset],
                                          noise_multiplicity=settings.privacy.noise_multiplicity)
    trainer.fit()
    privacy = None if plan is None else plan.summary(trainer.loop.state.step)
    with trainer.inference_weights() as (trained_unet,):
        if settings.method == "lora":
            merge_lora(trained_unet)
        base.unet = trained_unet
        base.register_to_config(differential_privacy=privacy)
        out = save_pipeline(base, finetuned_model_dir(config))
        digest = model_hash(base)
    runs = {"fine-tune": run_dir}
    if controlnet is not None:
        latents.label_maps = label_maps
        tuned = load_pipeline(out, config, progress, pairs=False)  # beside exactly what was saved, frozen
        probe = controlnet_probe(config, images, latents, controlnet_validation(config, records, summary["cache"]),
                                 label_names)
        runs["controlnet"] = run_dir / CONTROLNET_FOLDER
        fit_controlnet(config, tuned, controlnet, latents, runs["controlnet"], out, digest, probe, progress)
    base_model = {"path": str(settings.from_), "hash": base_hash, "method": settings.method,
                  "filter": settings.filter, "format": base_format(settings.from_)}
    if isinstance(controlnet, MaisiControlNet):
        base_model["label_indices"] = {name: controlnet.config.label_indices[value]
                                       for value, name in sorted(label_names.items()) if value}
    write_model_card(out, config, subset, summary, {}, digest, trainer.loop.state.step, base_model=base_model,
                     differential_privacy=privacy)
    write_training_compute(out, runs, inherited=Path(settings.from_))
    (run_dir / "finetune.json").write_text(json.dumps({"base_hash": base_hash, "hash": digest, "cases": len(subset)}))
    return FinetuneResult(out, digest, base_hash, len(subset), trainer.loop.state.step)


def _privacy_plan(config: RadsynthConfig, subset: list[CaseRecord]) -> PrivacyPlan | None:
    """The DP-SGD mechanism of a private fine-tune, or None; one line for settings no guarantee can come from."""
    settings = config.finetune
    privacy = settings.privacy
    if not privacy.enabled:
        return None
    if settings.method == "full":
        raise UserInputError("finetune.method", "full fine-tuning is not offered under finetune.privacy: the noise "
                             "grows with the trained parameters, millions here against thousands in an adapter",
                             "lora, domain_embedding or block_shifts")
    if Path(settings.from_).resolve() == model_dir(config).resolve():
        raise UserInputError("finetune.from", "is the model this config trains on these very patients: no guarantee "
                             "about them can come from fine-tuning it", "a base trained on other (public) data")
    patients = len({record.patient_id for record in subset})
    return plan_privacy(privacy.epsilon, privacy.delta, privacy.max_grad_norm, patients,
                        min(config.diffusion.batch_size, patients), settings.max_steps, privacy.accountant,
                        privacy.clipping)

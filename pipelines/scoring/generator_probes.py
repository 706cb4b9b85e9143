"""White-box probes of a trained generator: near copies it could emit, and a membership-inference attack.

A generator that memorised its training set can hand a training image back in two ways that a copy detector
must catch: the autoencoder's round trip of it (what a sampler that lands on a training latent decodes to)
and a *partial-noise regeneration* of it (SDEdit: noise a training latent part of the way, denoise it again).
Both are made here from the pipeline's own components, so the detector is calibrated on exactly the copies
this model would make.

The membership-inference attack asks whether the model fits its training images better than unseen images
of the same distribution: per image and per fixed timestep, the training loss of the diffusion backbone with
fixed noise. Members (a train subset) and non-members (holdout) get the same noise per sample index and the
same timesteps, so the only difference between the two is whether the model saw the image. The AUC of
``-mean loss`` is 0.5 for a model that generalises and approaches 1 for one that memorised.

All probes are dimension-generic (2D and 3D latents alike) and batch-size independent: every random draw is
made per sample index from its own seeded generator.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from radsynth.generators.objectives import TrainingObjective

from .bootstrap import bootstrap
from .image_sets import ImageSet
from .roc import MAX_FPR, mann_whitney_auc, tpr_at_fpr

__all__ = [
    "GeneratorLatentFeatures",
    "MembershipResult",
    "autoencoder_round_trip",
    "denoising_losses",
    "evenly_spread_timesteps",
    "membership_inference",
    "membership_inference_report",
    "partial_noise_regeneration",
]



# ------------------------------------------------------------------------------------------------ helpers


@contextmanager
def _eval_mode(*modules: torch.nn.Module) -> Iterator[None]:
    """Deterministic forward passes (no dropout in the text transformer), the caller's modes restored after."""
    modes = [module.training for module in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, mode in zip(modules, modes, strict=True):
            module.train(mode)


def _sample_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample index: sample i draws the same numbers whatever batch it sits in."""
    generators = []
    for index in indices:
        generator = torch.Generator()
        generator.manual_seed(int(np.random.default_rng([seed, int(index)]).integers(2**62)))
        generators.append(generator)
    return generators


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def _check_images(pipeline, images: torch.Tensor) -> torch.Tensor:
    images = torch.as_tensor(images)
    dims = pipeline.config.spatial_dims  # radsynth images are single-channel, whatever the codec takes inside
    if images.ndim != dims + 2 or images.shape[1] != 1:
        raise ValueError(f"images must be (N, 1, *{dims} spatial), got {tuple(images.shape)}")
    return images


def _check_prompts(prompts: Sequence[str], n: int) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if len(prompts) != n:
        raise ValueError(f"got {len(prompts)} prompts for {n} images: give one prompt per image")
    return prompts


@torch.no_grad()
def _decode(pipeline, latents: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1], clipped as the pipeline clips its samples."""
    return pipeline.decode(latents).cpu()


# --------------------------------------------------------------------------------------------- near copies


def autoencoder_round_trip(pipeline, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """decode(encode(images)) with the posterior mean: the near copy a generator that memorised would emit.

    images: (N, 1, *spatial) in [-1, 1]. Returns a float32 CPU tensor of the same shape, clipped to [-1, 1].
    """
    images = _check_images(pipeline, images)
    with _eval_mode(pipeline.vae):
        diffusion = pipeline.diffusion()
        return torch.cat([_decode(pipeline, diffusion.encode(images[rows])) for rows in _batches(len(images),
                                                                                                 batch_size)])


class GeneratorLatentFeatures:
    """The generator's own autoencoder latents (posterior means, flattened) as a feature space: a diagnostic.

    A model is not judged in a space it was trained to fit: its latents are what its diffusion model learnt to
    reproduce, so realism measured there flatters it. Shown next to the independent spaces, a large gap says
    the decoder, not the diffusion model, is where samples go wrong (or the other way round).
    """

    name = "generator_latents"

    def __init__(self, pipeline, batch_size: int = 16):
        self.pipeline, self.batch_size = pipeline, batch_size

    def extract(self, images: np.ndarray, masks: np.ndarray | None = None, batch_size: int | None = None) -> np.ndarray:
        tensor = _check_images(self.pipeline, torch.from_numpy(np.ascontiguousarray(images, np.float32))[:, None])
        diffusion = self.pipeline.diffusion()
        with _eval_mode(self.pipeline.vae), torch.no_grad():
            latents = [diffusion.encode(tensor[rows]).flatten(1).double().cpu()
                       for rows in _batches(len(tensor), batch_size or self.batch_size)]
        return torch.cat(latents).numpy()


def _default_call_argument(pipeline, name: str):
    """The pipeline's own default for a sampling setting, so a regeneration is sampled as samples are."""
    return inspect.signature(type(pipeline).__call__).parameters[name].default


def partial_noise_regeneration(
    pipeline,
    images: torch.Tensor,
    prompts: Sequence[str],
    strength: float = 0.3,
    seed: int = 0,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    batch_size: int = 16,
    spacing: Sequence[float] | torch.Tensor | None = None,
    conditions: Sequence[dict] | None = None,
    label_maps: np.ndarray | None = None,
) -> torch.Tensor:
    """SDEdit near copies: encode, noise the latent to ``strength`` of the schedule, denoise with the prompt, decode.

    strength: the share of the sampling schedule that is redone, diffusers' img2img convention: 0 keeps the
        latent (the result is the autoencoder round trip), 1 starts from (almost) pure noise.
    num_inference_steps, guidance_scale: default to the pipeline's own sampling defaults.
    spacing: (spatial_dims,) mm for a UNet that reads spacing (3D); the pipeline's spacing when None.
    conditions: each image's attribute values (its class label); default: read from the prompts' headers.
    label_maps: (N, *spatial) each image's own label map, for a UNet that reads maps (``_own_maps``).
    seed: the noise of sample i depends on (seed, i) only, never on the batch.
    Works with every scheduler the pipeline may carry: the noising is the model's own noise path, and each
    step is the pipeline's sampling step (guidance, latent clip) under a fresh copy of its scheduler.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    images = _check_images(pipeline, images)
    prompts = _check_prompts(prompts, len(images))
    steps = num_inference_steps or _default_call_argument(pipeline, "num_inference_steps")
    guidance = _default_call_argument(pipeline, "guidance_scale") if guidance_scale is None else guidance_scale
    diffusion = pipeline.diffusion()
    outputs = []
    with _eval_mode(pipeline.vae, pipeline.unet, pipeline.text_encoder):
        for rows in _batches(len(images), batch_size):
            generators = _sample_generators(seed, range(rows.start, rows.stop))
            condition = diffusion.condition(prompts[rows], spacing=_rows(spacing, rows),
                                            conditions=None if conditions is None else conditions[rows],
                                            label_maps=_own_maps(diffusion, label_maps, rows))
            latents = _regenerate(pipeline, diffusion, diffusion.encode(images[rows]), condition, strength,
                                  generators, steps, guidance)
            outputs.append(_decode(pipeline, latents))
    return torch.cat(outputs)


def _own_maps(diffusion, label_maps: np.ndarray | None, rows: slice) -> torch.Tensor | None:
    """The rows' own label maps (B, 1, *spatial) where the UNet reads maps itself: the attacker holds the whole case,
    map included, and a probe without it would see the model at its map-dropout fallback and understate leakage.
    None for every other model (a ControlNet's maps are not part of the base model's training)."""
    if label_maps is None or not diffusion.map_labels:
        return None
    return torch.as_tensor(np.asarray(label_maps[rows])).long().unsqueeze(1)


def _rows(values, rows: slice):
    """``values[rows]`` for per-image values (N, ...), the value itself when it is shared by every image."""
    values = None if values is None else torch.as_tensor(values)
    return values[rows] if values is not None and values.ndim == 2 else values


def _strength_timesteps(scheduler, num_inference_steps: int, strength: float, device) -> torch.Tensor:
    """The tail of the schedule that a ``strength`` regeneration runs (diffusers' img2img ``get_timesteps``)."""
    scheduler.set_timesteps(num_inference_steps, device=device)
    start = int(max(num_inference_steps - num_inference_steps * strength, 0))
    timesteps = scheduler.timesteps[start * scheduler.order:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start * scheduler.order)  # multistep solvers index sigmas from here
    return timesteps


@torch.no_grad()
def _regenerate(pipeline, diffusion, clean: torch.Tensor, condition, strength: float,
                generators: list[torch.Generator], num_inference_steps: int, guidance_scale: float) -> torch.Tensor:
    # A copy: the sampler's state (step index, solver history) must not leak into the pipeline's next call.
    scheduler = copy.deepcopy(pipeline.scheduler)
    timesteps = _strength_timesteps(scheduler, num_inference_steps, strength, clean.device)
    if len(timesteps) == 0:
        return clean
    noise = randn_tensor(clean.shape, generator=generators, device=clean.device, dtype=clean.dtype)
    latents = diffusion.objective.noised(clean, noise, timesteps[0])
    return diffusion.sample(latents, condition, scheduler, timesteps, guidance_scale=guidance_scale,
                            generator=generators)


# ------------------------------------------------------------------------------------- denoising losses


def evenly_spread_timesteps(objective: TrainingObjective, count: int) -> np.ndarray:
    """``count`` training timesteps at the centres of equal slices of the schedule (in 0..num_train_timesteps).

    Centres rather than ends: t = 0 (no noise) and t = T (pure noise) carry no membership signal.
    """
    if count < 1:
        raise ValueError(f"need at least one timestep, got {count}")
    centres = (np.arange(count) + 0.5) * objective.num_train_timesteps / count
    return centres if objective.is_flow else np.floor(centres).astype(np.int64)


def _objective_timesteps(objective: TrainingObjective, timesteps: Sequence[int] | int) -> np.ndarray:
    """Timesteps in the objective's own unit: integer indices, or t in (0, 1) for rectified flow."""
    if isinstance(timesteps, (int, np.integer)):
        values = evenly_spread_timesteps(objective, int(timesteps))
    else:
        values = np.asarray(timesteps, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError("timesteps must be a count or a non-empty 1-D sequence")
    if values.min() < 0 or values.max() >= objective.num_train_timesteps:
        raise ValueError(f"timesteps must lie in [0, {objective.num_train_timesteps}), got {values.tolist()}")
    if objective.is_flow:
        return values / objective.num_train_timesteps  # the UNet sees t * num_train_timesteps, as in training
    return values.astype(np.int64)


def denoising_losses(
    pipeline,
    images: torch.Tensor,
    prompts: Sequence[str],
    timesteps: Sequence[int] | int = 10,
    noise_seed: int = 0,
    batch_size: int = 16,
    spacing: Sequence[float] | torch.Tensor | None = None,
    conditions: Sequence[dict] | None = None,
    label_maps: np.ndarray | None = None,
) -> np.ndarray:
    """(N, T) training losses per image and fixed timestep: the white-box membership signal.

    images: (N, 1, *spatial) in [-1, 1]; prompts: one per image (the image's own training caption).
    timesteps: a count spread evenly over the training schedule, or training timesteps (0..T-1; for
        rectified flow t = timestep / num_train_timesteps).
    noise_seed: image i gets the noise drawn from (noise_seed, i) at every call, so members and non-members at
        the same index are noised identically and the losses do not depend on ``batch_size``.
    spacing: (spatial_dims,) or (N, spatial_dims) mm, read only by UNets that use spacing (3D).
    conditions: each image's attribute values (its class label); default: read from the prompts' headers.
    label_maps: (N, *spatial) each image's own label map, for a UNet that reads maps (``_own_maps``).
    The clean latent is the posterior mean (the centre of what training drew from), which removes one source
    of noise from the comparison.
    """
    images = _check_images(pipeline, images)
    prompts = _check_prompts(prompts, len(images))
    diffusion = pipeline.diffusion()
    objective = diffusion.objective
    steps = _objective_timesteps(objective, timesteps)
    losses = np.zeros((len(images), len(steps)), dtype=np.float64)
    with _eval_mode(pipeline.vae, pipeline.unet, pipeline.text_encoder), torch.no_grad():
        for rows in _batches(len(images), batch_size):
            latents = diffusion.encode(images[rows])
            condition = diffusion.condition(prompts[rows], spacing=_rows(spacing, rows),
                                            conditions=None if conditions is None else conditions[rows],
                                            label_maps=_own_maps(diffusion, label_maps, rows))
            generators = _sample_generators(noise_seed, range(rows.start, rows.stop))
            # One (T, C, *spatial) block per sample from its own generator: noise independent of the batch.
            noise = torch.stack([torch.randn((len(steps), *latents.shape[1:]), generator=g) for g in generators])
            for column, step in enumerate(steps):
                timestep = torch.full((len(latents),), step, dtype=torch.float32 if objective.is_flow else torch.long)
                losses[rows, column] = diffusion.losses(latents, condition, noise[:, column].to(latents),
                                                        timestep.to(latents.device)).cpu().numpy()
    return losses


# ----------------------------------------------------------------------------------- membership inference


@dataclass
class MembershipResult:
    """A membership-inference attack's outcome. Scores: higher = more likely a member (-mean loss).

    fpr_resolution: "" when there are enough non-members to resolve 1% FPR, else why the TPR is coarser.
    best_timestep_auc: the best single timestep's AUC; chosen after looking, so optimistic (a diagnostic of
    where the model leaks, not the headline number).
    """

    auc: float
    tpr_at_1pct_fpr: float
    fpr_resolution: str
    best_timestep_auc: float
    best_timestep_index: int
    per_timestep_auc: np.ndarray
    member_scores: np.ndarray
    non_member_scores: np.ndarray

    @property
    def n_members(self) -> int:
        return len(self.member_scores)

    @property
    def n_non_members(self) -> int:
        return len(self.non_member_scores)

    def to_dict(self) -> dict:
        return {"auc": self.auc, "tpr_at_1pct_fpr": self.tpr_at_1pct_fpr, "fpr_resolution": self.fpr_resolution,
                "best_timestep_auc": self.best_timestep_auc, "best_timestep_index": self.best_timestep_index,
                "per_timestep_auc": [float(v) for v in self.per_timestep_auc], "n_members": self.n_members,
                "n_non_members": self.n_non_members}


def _loss_table(losses: np.ndarray, name: str) -> np.ndarray:
    losses = np.asarray(losses, dtype=np.float64)
    if losses.ndim == 1:
        losses = losses[:, None]
    if losses.ndim != 2 or len(losses) == 0 or not np.isfinite(losses).all():
        raise ValueError(f"{name} must be a non-empty finite (N, T) array, got shape {losses.shape}")
    return losses


def membership_inference(member_losses: np.ndarray, non_member_losses: np.ndarray) -> MembershipResult:
    """Loss-threshold attack over (N, T) member and (M, T) non-member losses: score = -mean loss over timesteps."""
    members, non_members = _loss_table(member_losses, "member_losses"), _loss_table(non_member_losses,
                                                                                      "non_member_losses")
    if members.shape[1] != non_members.shape[1]:
        raise ValueError(f"members have {members.shape[1]} timesteps, non-members {non_members.shape[1]}")
    member_scores, non_member_scores = -members.mean(axis=1), -non_members.mean(axis=1)
    per_timestep = np.array([mann_whitney_auc(-members[:, t], -non_members[:, t]) for t in range(members.shape[1])])
    best = int(np.argmax(per_timestep))
    m = len(non_member_scores)
    resolution = "" if m * MAX_FPR >= 1 - 1e-9 else (
        f"only {m} non-members: the smallest non-zero FPR is 1/{m} = {1 / m:.3g} > {MAX_FPR:g}, "
        "so the TPR reported is the TPR at FPR 0 (no non-member above the threshold)")
    return MembershipResult(mann_whitney_auc(member_scores, non_member_scores),
                            tpr_at_fpr(member_scores, non_member_scores), resolution, float(per_timestep[best]), best,
                            per_timestep, member_scores, non_member_scores)


def _equal_sized(members: ImageSet, non_members: ImageSet, n_max: int | None, seed: int) -> tuple[ImageSet, ImageSet]:
    """Both sets cut to the same size (the smaller one's, at most n_max) by a seeded draw without replacement.

    Equal sizes make AUC 0.5 the chance level at equal precision on both sides and give both sets one noise
    draw per index.
    """
    n = min(len(members), len(non_members), n_max or max(len(members), len(non_members)))
    if n < 1:
        raise ValueError("membership inference needs at least one member and one non-member image")
    rng = np.random.default_rng(seed)

    def cut(images: ImageSet) -> ImageSet:
        return images if len(images) == n else images.subset(np.sort(rng.choice(len(images), n, replace=False)))

    return cut(members), cut(non_members)


def _as_batch(images: ImageSet) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images.images, dtype=np.float32)).unsqueeze(1)


def membership_inference_report(
    pipeline,
    members: ImageSet,
    non_members: ImageSet,
    n_max: int | None = 500,
    timesteps: Sequence[int] | int = 10,
    noise_seed: int = 0,
    seed: int = 0,
    batch_size: int = 16,
    n_boot: int = 200,
    by: str | None = None,
) -> dict:
    """The white-box attack on a trained pipeline: members = a train subset, non-members = holdout, equal sizes.

    members / non_members: images in [-1, 1] with their prompts (the captions the model trained on) and spacing,
        and their label maps, which a UNet that reads maps is probed with.
    n_max: cap on each set's size (the larger set is subsampled with ``seed``).
    by: a condition key (e.g. "finding"): also the AUC within each value it takes in both sets.
    Returns a JSON-ready dict: auc with a patient-level bootstrap CI over both sets, tpr_at_1pct_fpr,
    fpr_resolution, best single-timestep AUC, sizes, timesteps, and the per-sample scores.
    """
    members, non_members = _equal_sized(members, non_members, n_max, seed)
    objective = pipeline.objective
    steps = _objective_timesteps(objective, timesteps)
    training_steps = steps * objective.num_train_timesteps if objective.is_flow else steps
    losses = [denoising_losses(pipeline, _as_batch(images), images.prompts, timesteps, noise_seed, batch_size,
                               images.spacing, images.conditions, images.masks) for images in (members, non_members)]
    result = membership_inference(*losses)

    def auc_of(member_rows: np.ndarray, non_member_rows: np.ndarray) -> float:
        return mann_whitney_auc(result.member_scores[member_rows], result.non_member_scores[non_member_rows])

    report = {**result.to_dict(), "auc_ci": bootstrap(auc_of, [members.groups, non_members.groups], n_boot,
                                                       seed).to_dict(),
              "objective": objective.name, "timesteps": [float(s) for s in training_steps],
              "noise_seed": noise_seed, "mean_member_loss": float(losses[0].mean()),
              "mean_non_member_loss": float(losses[1].mean()),
              "per_sample": [{"id": i, "member": is_member, "score": float(s)}
                             for images, scores, is_member in ((members, result.member_scores, True),
                                                               (non_members, result.non_member_scores, False))
                             for i, s in zip(images.ids, scores, strict=True)]}
    if by is not None:
        report["by_condition"] = _auc_by_condition(result, members, non_members, by)
    return report


def _auc_by_condition(result: MembershipResult, members: ImageSet, non_members: ImageSet, key: str) -> dict:
    member_values = np.array([str(c.get(key, "")) for c in members.conditions])
    non_member_values = np.array([str(c.get(key, "")) for c in non_members.conditions])
    table = {}
    for value in sorted(set(member_values.tolist()) & set(non_member_values.tolist())):
        m, h = member_values == value, non_member_values == value
        table[value] = {"auc": mann_whitney_auc(result.member_scores[m], result.non_member_scores[h]),
                        "n_members": int(m.sum()), "n_non_members": int(h.sum())}
    return table

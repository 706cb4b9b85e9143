"""One latent diffusion model: how its denoiser is conditioned, trained, probed and sampled, written once.

MONAI's ``LatentDiffusionInferer`` pattern. A ``LatentDiffusion`` holds a denoiser (the UNet, or the mask
generator), its codec (the autoencoder, or the mask generator's label-share map), the text encoder, the
objective the denoiser was trained with and optionally a ControlNet beside it, and it is the only code that
calls the denoiser. A label map steers it through that ControlNet, or through the denoiser's own input when the
UNet was built to read one (``RadsynthUNet(label_channels=...)``):

- ``condition``: a ``Conditioning`` (text states, class labels, spacing, augmentation labels, one-hot label maps)
  built once per batch from prompts and attribute values (data, never prompt text parsed back) - the same for
  training and sampling;
- ``predict``: the denoiser's output, with the ControlNet's residuals added inside it (or the map in its input);
- ``losses``: the training loss of each sample (trainers average it; the membership probe reads it per image);
- ``sample``: a diffusers scheduler's loop with classifier-free guidance, the clean-latent clip and an
  optional constraint on the latents (inpainting's known region).

Trainers, every sampling pipeline, the privacy probes and distillation build one of these and call it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .controlnet import one_hot_labels
from .objectives import TrainingObjective
from .prompts import parse_prompt

__all__ = ["NULL_PROMPT", "Conditioning", "Constraint", "LatentDiffusion", "guidance_at"]

NULL_PROMPT = ""  # what a dropped condition reads as: the unconditional half of classifier-free guidance
NULL_CLASS = 0  # class index of "no class" (dropped, or a value the model never saw)
# (latents, model timestep or None after the last step) -> latents: what sampling must keep (a known region).
Constraint = Callable[[Tensor, "Tensor | None"], Tensor]


@dataclass(frozen=True)
class Conditioning:
    """What a batch is denoised under, one row per sample.

    context: text states (B, T, D); class_labels: (B,) indices, 0 = none; spacing: (B, spatial_dims) mm, for a
    denoiser that reads it; control: one-hot label maps (B, L, *image_shape), for the ControlNet or a UNet that
    reads maps (a row of zeros: no map); augment: the augmentation labels of transformed training latents
    (``augmentation.LatentAugment``; None: no transform).
    """

    context: Tensor
    class_labels: Tensor | None = None
    spacing: Tensor | None = None
    control: Tensor | None = None
    augment: Tensor | None = None

    def __len__(self) -> int:
        return len(self.context)

    def cat(self, other: Conditioning) -> Conditioning:
        """``self`` rows, then ``other``'s: the doubled batch of classifier-free guidance."""
        def both(a: Tensor | None, b: Tensor | None) -> Tensor | None:
            return None if a is None else torch.cat([a, b])
        return Conditioning(torch.cat([self.context, other.context]), both(self.class_labels, other.class_labels),
                            both(self.spacing, other.spacing), both(self.control, other.control),
                            both(self.augment, other.augment))


class LatentDiffusion:
    """A denoiser over a codec's latents, conditioned on text (+ classes, spacing, a label map for its ControlNet or
    its own input).

    denoiser: ``RadsynthUNet`` or ``RadsynthMaskGenerator`` (``(sample, timestep, context, class_labels=,
        spacing=, **residuals)``); codec: anything with ``encode(images) -> latents`` and ``decode``;
    objective: what the denoiser predicts (saved with the model, see ``RadsynthPipeline.objective``);
    class_attribute, class_names: the attribute fed as a class embedding and its values (index = position + 1);
    latent_clip: clip the clean latents a prediction implies to +-this while sampling (None: no clip);
    spacing: the model's own voxel spacing, used when a batch gives none;
    loss_weights: (clean latents, condition) -> weights (broadcastable to the latents) of each element's squared
        error in ``losses``, towards rare labels (``mask_generator.LabelLossWeights``,
        ``controlnet.ControlLossWeights``); None: every element alike.
    """

    def __init__(self, denoiser: torch.nn.Module, codec, text_encoder: torch.nn.Module,
                 objective: TrainingObjective, *, controlnet: torch.nn.Module | None = None,
                 conditioning_scale: float = 1.0, class_attribute: str | None = None,
                 class_names: Sequence[str] = (), latent_clip: float | None = None,
                 spacing: Sequence[float] | None = None,
                 loss_weights: Callable[[Tensor, Conditioning], Tensor] | None = None):
        self.denoiser, self.codec, self.text_encoder, self.objective = denoiser, codec, text_encoder, objective
        self.controlnet, self.conditioning_scale = controlnet, conditioning_scale
        self.class_attribute, self.class_names = class_attribute, list(class_names)
        self.latent_clip, self.spacing, self.loss_weights = latent_clip, spacing, loss_weights

    # ------------------------------------------------------------------------------------ conditioning

    @property
    def device(self) -> torch.device:
        return next(_unwrapped(self.denoiser).parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(_unwrapped(self.denoiser).parameters()).dtype

    @property
    def uses_spacing(self) -> bool:
        # A denoiser that derives it says so (MaisiUNet); radsynth's own record it in their config.
        denoiser = _unwrapped(self.denoiser)
        return bool(getattr(denoiser, "uses_spacing", denoiser.config.get("use_spacing", False)))

    @property
    def map_labels(self) -> int:
        """The labels of the one-hot maps this model reads (its ControlNet's, or its UNet's own input's); 0: none."""
        if self.controlnet is not None:
            return _unwrapped(self.controlnet).num_labels
        return int(_unwrapped(self.denoiser).config.get("label_channels", 0))

    def class_labels(self, conditions: Sequence[Mapping[str, object]]) -> Tensor | None:
        """Class indices of the class attribute's values (0, the null class, when absent or unseen)."""
        if not self.class_attribute or not self.class_names:
            return None
        values = [None if (value := c.get(self.class_attribute)) is None else str(value) for c in conditions]
        return torch.tensor([self.class_names.index(v) + 1 if v in self.class_names else NULL_CLASS for v in values])

    def condition(self, prompts: Sequence[str], *, conditions: Sequence[Mapping[str, object]] | None = None,
                  class_labels: Tensor | None = None, spacing: Tensor | Sequence[float] | None = None,
                  label_maps: Tensor | None = None, keep: Tensor | None = None, keep_map: Tensor | None = None,
                  augment: Tensor | None = None) -> Conditioning:
        """The conditioning of a batch, built once.

        conditions: each sample's attribute values (the class label's source); without them, the attribute
            header of a rendered prompt (``prompts.parse_prompt``, the inverse of ``render_prompt``).
        class_labels: indices given directly (a training batch's), instead of ``conditions``.
        spacing: (B, spatial_dims) or (spatial_dims,) mm; default the model's own.
        label_maps: integer maps (B, 1, *image_shape) or one-hot floats, for the ControlNet or a UNet that reads them.
        keep: (B,) booleans, False where a condition is dropped (training's classifier-free dropout): the text
            becomes the null prompt and the class the null class; spacing, label map and augmentation are always
            kept.
        keep_map: (B,) booleans, False where the label map is dropped (its rows zero: no map), so a UNet that
            reads maps also learns to draw without one (``conditioning.mask_dropout``).
        augment: (B, label_dims) augmentation labels of transformed training latents (training only).
        """
        prompts = list(prompts)
        if keep is not None:
            prompts = [prompt if kept else NULL_PROMPT for prompt, kept in zip(prompts, keep.tolist())]
        device, dtype = self.device, self.dtype
        context = self._text(prompts).to(device=device, dtype=dtype)
        if class_labels is None:
            class_labels = self.class_labels(conditions if conditions is not None else [parse_prompt(p) for p in prompts])
        if class_labels is not None:
            class_labels = (class_labels * keep if keep is not None else class_labels).to(device)
        control = None if label_maps is None else self._control(label_maps)
        if control is not None and keep_map is not None:
            control = control * keep_map.to(control.device).view(-1, *[1] * (control.ndim - 1)).to(control.dtype)
        return Conditioning(context, class_labels, self._spacing(spacing, len(prompts)), control,
                            None if augment is None else augment.to(device=device, dtype=dtype))

    def unconditional(self, condition: Conditioning) -> Conditioning:
        """The null half of classifier-free guidance: null prompt and class; spacing, label map and augmentation
        kept (the map is the control, not the condition being guided)."""
        null = self._text([NULL_PROMPT]).to(device=self.device, dtype=self.dtype)
        classes = None if condition.class_labels is None else torch.zeros_like(condition.class_labels)
        return replace(condition, context=null.expand(len(condition), *null.shape[1:]), class_labels=classes)

    def _text(self, prompts: Sequence[str]) -> Tensor:
        # Through the module itself, not its ``encode``: a distributed wrapper syncs gradients of forward calls only.
        return self.text_encoder(*_unwrapped(self.text_encoder).tokenize(prompts))

    def _spacing(self, spacing, batch: int) -> Tensor | None:
        if not self.uses_spacing:
            return None
        spacing = torch.as_tensor(self.spacing if spacing is None else spacing, dtype=torch.float32)
        return (spacing.expand(batch, -1) if spacing.ndim == 1 else spacing).to(self.device)

    def _control(self, label_maps: Tensor) -> Tensor:
        if not self.map_labels:
            raise ValueError("label maps steer a ControlNet or a UNet built to read them, and this model has neither")
        maps = torch.as_tensor(label_maps)
        if not maps.is_floating_point():
            maps = one_hot_labels(maps, self.map_labels)
        return maps.to(device=self.device, dtype=self.dtype)

    # ---------------------------------------------------------------------------------------- denoiser

    def predict(self, noisy: Tensor, timesteps: Tensor, condition: Conditioning) -> Tensor:
        """The denoiser's output for ``noisy`` at ``timesteps`` (model units), the ControlNet's residuals inside (or
        the label map in its input)."""
        # Only a denoiser trained with augmentation (or maps) reads its labels (the others' signatures lack them).
        extra = {} if condition.augment is None else {"augment": condition.augment}
        if condition.control is not None and self.controlnet is None:
            extra["label_map"] = condition.control
        elif condition.control is not None:
            context = _unwrapped(self.denoiser).conditioning_context(condition.context, condition.spacing, **extra)
            down, mid = self.controlnet(noisy, timesteps, context, condition.control, self.conditioning_scale,
                                        condition.class_labels)
            extra |= {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        return self.denoiser(noisy, timesteps, encoder_hidden_states=condition.context,
                             class_labels=condition.class_labels, spacing=condition.spacing, **extra)

    def losses(self, clean: Tensor, condition: Conditioning, noise: Tensor, timesteps: Tensor) -> Tensor:
        """The training loss of each sample, (B,): the MSE between the denoiser's output and the objective's
        target. timesteps: the objective's own unit (``TrainingObjective.sample_timesteps``)."""
        noisy, target, model_timesteps = self.objective.noisy_and_target(clean, noise, timesteps)
        prediction = self.predict(noisy, model_timesteps, condition)
        squared = (prediction.float() - target.float()) ** 2
        if self.loss_weights is not None:
            squared = squared * self.loss_weights(clean, condition).to(squared.device)
        per_sample = squared.reshape(len(clean), -1).mean(dim=1)
        timestep_weights = self.objective.loss_weights(timesteps)
        return per_sample if timestep_weights is None else per_sample * timestep_weights.to(per_sample.device)

    def guided_prediction(self, latents: Tensor, timestep: Tensor, condition: Conditioning, guidance_scale: float,
                          unconditional: Conditioning | None = None) -> Tensor:
        """The output one sampling step uses: guided (given the null half) and clipped (``latent_clip``)."""
        if unconditional is None:
            prediction = self.predict(latents, timestep, condition)
        else:
            timesteps = torch.as_tensor(timestep)
            both = torch.cat([timesteps, timesteps]) if timesteps.numel() > 1 else timesteps  # one per sample, or one
            null, conditional = self.predict(torch.cat([latents, latents]), both, unconditional.cat(condition)).chunk(2)
            prediction = null + guidance_scale * (conditional - null)
        if self.latent_clip is not None:
            prediction = self.objective.clip_output(latents, prediction, timestep, self.latent_clip)
        return prediction

    @torch.no_grad()
    def sample(self, latents: Tensor, condition: Conditioning, scheduler, timesteps: Iterable[Tensor] | None = None,
               *, guidance_scale: float = 1.0, guidance_interval: tuple[float, float] | None = None, generator=None,
               constrain: Constraint | None = None) -> Tensor:
        """Denoise ``latents`` under ``scheduler`` (already set to its timesteps) over ``timesteps`` (default all
        of the scheduler's; a tail of them regenerates from mid-schedule). Guidance > 1 runs the null half too, at
        every step or at those whose noise level lies in ``guidance_interval`` (``guidance_at``).
        constrain: applied to the latents before each step (with its timestep) and after the last (with None)."""
        unconditional = self.unconditional(condition) if guidance_scale > 1.0 else None
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
        for timestep in scheduler.timesteps if timesteps is None else timesteps:
            if constrain is not None:
                latents = constrain(latents, timestep)
            # The samplers radsynth uses (DDPM, DDIM, DPM-Solver, FlowMatchEuler, consistency) feed the latents to
            # the model unscaled (no scale_model_input), so the clip below reads the same latents the step does.
            scale = guidance_at(timestep, scheduler.config.num_train_timesteps, guidance_scale, guidance_interval)
            prediction = self.guided_prediction(latents, timestep, condition, scale,
                                                unconditional if scale > 1.0 else None)
            latents = scheduler.step(prediction, timestep, latents, **step_kwargs).prev_sample
        return latents if constrain is None else constrain(latents, None)

    @torch.no_grad()
    def travel(self, latents: Tensor, condition: Conditioning, timesteps: Sequence[float | Tensor], *,
               guidance_scale: float = 1.0, land_clean: bool = False) -> Tensor:
        """Deterministic steps along the model's probability-flow path (DDIM's, Euler's for rectified flow), from
        ``latents`` at ``timesteps[0]`` through each later timestep (model units). Rising timesteps invert (clean
        -> noise: the encoding of dual diffusion implicit bridges), falling ones denoise.

        Each step splits the latents into the clean latents and noise the denoiser implies, and recombines them at
        the next noise level; written on ``TrainingObjective``'s one noise path, so it serves every objective.
        land_clean: return the clean latents implied at the last timestep (the final jump of a sampler to t=0).
        """
        unconditional = self.unconditional(condition) if guidance_scale > 1.0 else None
        points = [torch.as_tensor(t, device=self.device) for t in timesteps]  # the denoiser's device, as a scheduler's
        for here, there in zip(points[:-1], points[1:]):
            clean, noise = self._implied(latents, here, condition, guidance_scale, unconditional)
            latents = self.objective.noised(clean, noise, there).to(self.dtype)
        if land_clean:
            latents = self._implied(latents, points[-1], condition, guidance_scale, unconditional)[0].to(self.dtype)
        return latents

    def _implied(self, latents: Tensor, timestep: Tensor, condition: Conditioning, guidance_scale: float,
                 unconditional: Conditioning | None) -> tuple[Tensor, Tensor]:
        prediction = self.guided_prediction(latents, timestep, condition, guidance_scale, unconditional)
        return self.objective.clean_and_noise(latents, prediction, timestep)

    # ------------------------------------------------------------------------------------------- codec

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Scaled posterior-mean latents of images in [-1, 1] (the centre of what training drew from)."""
        codec = _unwrapped(self.codec)
        return codec.encode(images.to(device=codec.device, dtype=codec.dtype)).to(self.dtype)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        codec = _unwrapped(self.codec)
        return codec.decode(latents.to(device=codec.device, dtype=codec.dtype))


def guidance_at(timestep: Tensor | float, num_train_timesteps: int, guidance_scale: float,
                interval: tuple[float, float] | None) -> float:
    """The guidance of the step at ``timestep``: ``guidance_scale`` where its noise level (``timestep`` over the
    training schedule's length: 1 pure noise, 0 clean; a flow-matching scheduler's timestep is its sigma times that
    length) lies in ``interval``, 1 (the conditional model alone) outside it. No interval: every step.

    Guidance at high noise narrows what samples become most, and late guidance adds little (Kynkaanniemi et al.
    2024, "Applying guidance in a limited interval"); skipping it halves those steps' compute."""
    if interval is None:
        return guidance_scale
    level = float(timestep) / num_train_timesteps
    return guidance_scale if interval[0] <= level <= interval[1] else 1.0


def _unwrapped(module):
    """The model inside a distributed wrapper (accelerate's prepare), whose config and helpers we read."""
    return getattr(module, "module", module)

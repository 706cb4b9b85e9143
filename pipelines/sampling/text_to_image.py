"""Text-to-image latent diffusion for 2D and 3D medical images, as a diffusers ``DiffusionPipeline``.

prompts -> text encoder -> the UNet denoises Gaussian latents step by step under a diffusers scheduler (with
classifier-free guidance) -> the autoencoder decodes them -> images in [-1, 1] or in physical units.

The pipeline's own config (modality, image shape, spacing, intensity range, latent clip) is registered next to
its components, so ``save_pretrained`` writes it into ``model_index.json`` and ``from_pretrained`` restores a
pipeline that knows what it generates and how to map it back to HU / scanner units. Everything is saved as
safetensors + JSON; loading never unpickles.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DiffusionPipeline, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

# The component classes must be imported for from_pretrained: diffusers loads a component only from a module
# that is already imported (model_index.json names it, but naming a module never runs its code).
from radsynth.generators.autoencoder import RadsynthAutoencoder  # noqa: F401
from radsynth.generators.objectives import clip_predicted_clean_latents
from radsynth.generators.text_encoder import PretrainedTextEncoder, RadsynthTextEncoder  # noqa: F401
from radsynth.generators.unet import RadsynthUNet  # noqa: F401

MODALITIES = ("ct", "mri", "xray")
# (model_input, timestep, context, class_labels, spacing) -> extra keyword arguments of the UNet's call.
Residuals = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"], dict]
# (latents, timestep or None after the last step) -> latents: what sampling must keep (inpainting's known region).
Constraint = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
OUTPUT_TYPES = ("np", "pt", "physical")


@dataclass
class RadsynthPipelineOutput(BaseOutput):
    """images: (B, 1, *image_shape), numpy for "np"/"physical", a tensor for "pt".

    latent_std: standard deviation of the final latents, a health check: training latents have about 1.0 after
    scaling, and a sampler that drifts (several times that) produces noise however good the decoder is.
    """

    images: np.ndarray | torch.Tensor
    latent_std: float


class RadsynthTextToImagePipeline(DiffusionPipeline):
    """Samples images from prompts with a RadsynthUNet over a RadsynthAutoencoder's latents.

    Works for 2D and 3D alike (``spatial_dims``): the diffusers schedulers step latents of any rank.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"

    def __init__(
        self,
        unet,
        vae,
        text_encoder,
        scheduler,
        modality: str = "xray",
        spatial_dims: int = 2,
        image_shape: tuple[int, ...] | list[int] = (64, 64),
        spacing: tuple[float, ...] | list[float] = (1.0, 1.0),
        intensity_low: float = 0.0,
        intensity_high: float = 1.0,
        latent_clip: float | None = None,
        class_attribute: str | None = None,
        class_names: tuple[str, ...] | list[str] = (),
    ):
        super().__init__()
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        if len(image_shape) != spatial_dims or len(spacing) != spatial_dims:
            raise ValueError(
                f"image_shape {tuple(image_shape)} and spacing {tuple(spacing)} need {spatial_dims} entries each"
            )
        if not intensity_high > intensity_low:
            raise ValueError(f"intensity_high ({intensity_high}) must exceed intensity_low ({intensity_low})")
        if latent_clip is not None and not latent_clip > 0:
            raise ValueError(f"latent_clip must be positive or None, got {latent_clip}")
        self.register_modules(unet=unet, vae=vae, text_encoder=text_encoder, scheduler=scheduler)
        # Tuples in, lists out of model_index.json: normalise so a loaded pipeline's config equals the saved one.
        self.register_to_config(
            modality=modality,
            spatial_dims=int(spatial_dims),
            image_shape=tuple(int(size) for size in image_shape),
            spacing=tuple(float(size) for size in spacing),
            intensity_low=float(intensity_low),
            intensity_high=float(intensity_high),
            latent_clip=None if latent_clip is None else float(latent_clip),
            class_attribute=class_attribute,
            class_names=tuple(class_names),
        )

    # ---------------------------------------------------------------------------------------- helpers

    def latent_shape(self, batch_size: int) -> tuple[int, ...]:
        factor = self.vae.downsample_factor
        if any(size % factor for size in self.config.image_shape):
            raise ValueError(
                f"image_shape {self.config.image_shape} is not divisible by the autoencoder's factor {factor}"
            )
        return (batch_size, self.unet.config.in_channels, *(size // factor for size in self.config.image_shape))

    def to_physical(self, images: np.ndarray) -> np.ndarray:
        """[-1, 1] -> physical units: the inverse of the preprocessing intensity map (IntensityMap.inverse)."""
        low, high = self.config.intensity_low, self.config.intensity_high
        return ((np.asarray(images, dtype=np.float32) + 1.0) / 2.0 * (high - low) + low).astype(np.float32)

    def encode_prompts(self, prompts: list[str], guided: bool) -> torch.Tensor:
        """Text states for the UNet: (B, T, D), or (2B, T, D) ordered [null prompts, prompts] when guided."""
        if not guided:
            return self.text_encoder.encode(prompts)
        states = self.text_encoder.encode(["", *prompts])
        null = states[:1].expand(len(prompts), *states.shape[1:])
        return torch.cat([null, states[1:]])

    def class_labels_for(self, prompts: list[str], guided: bool) -> torch.Tensor | None:
        """Class indices read from the prompts' ``attribute: value`` part (0, the null class, when absent)."""
        attribute = self.config.class_attribute
        if not attribute:
            return None
        names = list(self.config.class_names)
        pattern = re.compile(rf"(?:^|; ){re.escape(attribute)}: ([^;.]+)")
        values = [match.group(1).strip() if (match := pattern.search(prompt)) else None for prompt in prompts]
        labels = torch.tensor([names.index(v) + 1 if v in names else 0 for v in values])
        return torch.cat([torch.zeros_like(labels), labels]) if guided else labels

    def prepare_latents(
        self, batch_size: int, generator, latents: torch.Tensor | None, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        shape = self.latent_shape(batch_size)
        if latents is None:
            # A list of generators gives each sample its own seed (randn_tensor draws row by row), so one
            # sample can be regenerated exactly without the rest of its batch.
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        return latents.to(device=device, dtype=dtype) * getattr(self.scheduler, "init_noise_sigma", 1.0)

    def _step_kwargs(self, generator) -> dict:
        # Only stochastic schedulers (DDPM, DDIM with eta > 0) take a generator for their step noise.
        return {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}

    # ------------------------------------------------------------------------------------------- call

    def denoise(self, latents: torch.Tensor, timesteps, context: torch.Tensor, class_labels: torch.Tensor | None,
                spacing: torch.Tensor | None, guidance_scale: float, step_kwargs: dict,
                scheduler: SchedulerMixin | None = None, residuals: Residuals | None = None,
                denoiser: torch.nn.Module | None = None, latent_clip: float | None = None,
                constrain: Constraint | None = None) -> torch.Tensor:
        """Run ``scheduler`` (default: the pipeline's, already set to its timesteps) from ``latents`` over
        ``timesteps``. With guidance (> 1) ``context`` and ``class_labels`` hold the null half first. Also used to
        regenerate a partly noised latent from the middle of the schedule (scoring's near copies).

        residuals: called each step with (model_input, timestep, context, class_labels, spacing); returns
        keyword arguments added to the UNet's call (a ControlNet's down/mid residuals).
        denoiser, latent_clip: another model with the UNet's call (the mask generator) and its clip, in place of
        the UNet and the pipeline's ``latent_clip``.
        constrain: applied to the latents before each step (with its timestep) and after the last (with None)."""
        scheduler, denoiser = scheduler or self.scheduler, denoiser or self.unet
        guided = guidance_scale > 1.0
        latent_clip = self.config.latent_clip if latent_clip is None else latent_clip
        for timestep in timesteps:
            if constrain is not None:
                latents = constrain(latents, timestep)
            model_input = torch.cat([latents, latents]) if guided else latents
            if hasattr(scheduler, "scale_model_input"):
                model_input = scheduler.scale_model_input(model_input, timestep)
            extra = residuals(model_input, timestep, context, class_labels, spacing) if residuals else {}
            # Rectified flow: FlowMatchEuler's timesteps are already sigma * 1000, the unit the UNet trained on.
            prediction = denoiser(model_input, timestep, encoder_hidden_states=context, class_labels=class_labels,
                                  spacing=spacing, **extra)
            if guided:
                unconditional, conditional = prediction.chunk(2)
                prediction = unconditional + guidance_scale * (conditional - unconditional)
            if latent_clip is not None:
                prediction = clip_predicted_clean_latents(scheduler, latents, prediction, timestep, latent_clip)
            latents = scheduler.step(prediction, timestep, latents, **step_kwargs).prev_sample
        return latents if constrain is None else constrain(latents, None)

    @torch.no_grad()
    def __call__(
        self,
        prompts: str | list[str],
        num_inference_steps: int = 50,
        guidance_scale: float = 3.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        residuals: Residuals | None = None,
        constrain: Constraint | None = None,
    ) -> RadsynthPipelineOutput | tuple:
        """Generate one image per prompt.

        guidance_scale: classifier-free guidance; <= 1 runs the conditional model alone (half the compute).
        generator: one generator for the batch, or one per prompt for per-sample reproducibility.
        output_type: "np" / "pt" in [-1, 1], or "physical" (numpy, intensity_low..intensity_high). The
            decoder is not bounded, so its output is clipped to [-1, 1], the range training images had.
        residuals: extra UNet inputs per step (see ``denoise``); the mask-to-image pipeline passes its ControlNet's.
        constrain: a hook on the latents at every step (see ``denoise``); lesion inpainting keeps its background.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if isinstance(generator, list) and len(generator) != len(prompts):
            raise ValueError(f"got {len(generator)} generators for {len(prompts)} prompts")
        batch_size, guided = len(prompts), guidance_scale > 1.0
        device, dtype = self._execution_device, self.unet.dtype

        context = self.encode_prompts(prompts, guided).to(device=device, dtype=dtype)
        class_labels = self.class_labels_for(prompts, guided)
        class_labels = class_labels.to(device) if class_labels is not None else None
        latents = self.prepare_latents(batch_size, generator, latents, device, dtype)
        spacing = None
        if getattr(self.unet.config, "use_spacing", False):
            spacing = torch.tensor(self.config.spacing, device=device).expand(context.shape[0], -1)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = self.denoise(latents, self.progress_bar(self.scheduler.timesteps), context, class_labels, spacing,
                               guidance_scale, self._step_kwargs(generator), residuals=residuals, constrain=constrain)
        latent_std = float(latents.float().std())
        images = self.vae.decode(latents.to(self.vae.dtype)).float().clamp(-1.0, 1.0)
        self.maybe_free_model_hooks()
        if output_type != "pt":
            images = images.cpu().numpy()
        if output_type == "physical":
            images = self.to_physical(images)
        if not return_dict:
            return images, latent_std
        return RadsynthPipelineOutput(images=images, latent_std=latent_std)


def model_hash(pipeline: DiffusionPipeline) -> str:
    """sha256 over every model component's config and weights (names, dtypes, shapes, bytes), in name order.

    It identifies the trained model, so it is the same in memory, after save_pretrained and after
    from_pretrained, and changes with any weight. The scheduler and the pipeline's own config are sampling
    choices, recorded separately in each sample's sidecar, and are not part of it.
    """
    digest = hashlib.sha256()
    for name, component in sorted(pipeline.components.items()):
        if not isinstance(component, torch.nn.Module):
            continue
        config = dict(getattr(component, "config", {}))
        config = {key: value for key, value in config.items() if not key.startswith("_")}  # _name_or_path etc.
        digest.update(f"{name}:{type(component).__name__}".encode())
        digest.update(json.dumps(config, sort_keys=True, default=str).encode())
        for key, tensor in sorted(component.state_dict().items()):
            tensor = tensor.detach().to("cpu").contiguous()
            digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()

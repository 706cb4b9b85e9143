"""What every radsynth sampling pipeline shares: its components, its image space, and the steps it composes.

A trained model folder holds the base model (``unet``, ``vae``, ``text_encoder``, ``scheduler``) and, when it was
trained with masks, a ``mask_controlnet`` (unless its UNet reads the maps itself) and a ``mask_generator`` beside
it. Each task is a pipeline of its own (text-to-image, mask-to-image, text-to-pair, lesion inpainting), all
reading the same folder; none subclasses another. Each ``__call__`` reads as diffusers' pipelines do: check the
inputs -> build the conditioning -> ``LatentDiffusion.sample`` -> decode. The denoising itself lives in
``generators.latent_diffusion``, written once for training, sampling and the privacy probes.

The pipeline's config (modality, image shape, spacing, intensity range, latent clip, class vocabulary and the
objective the model was trained with) is registered next to its components, so ``save_pretrained`` writes it
into ``model_index.json`` and ``from_pretrained`` restores a pipeline that knows what it generates, how to map
it back to HU / scanner units, and how its denoiser must be sampled. Everything is saved as safetensors + JSON;
loading never unpickles.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from radsynth.configs.schema import MODALITIES, modality_parts

# The component classes must be imported for from_pretrained: diffusers loads a component only from a module
# that is already imported (model_index.json names it, but naming a module never runs its code).
from radsynth.generators.autoencoder import RadsynthAutoencoder
from radsynth.generators.consistency import ConsistencyScheduler  # noqa: F401
from radsynth.generators.controlnet import RadsynthControlNet
from radsynth.generators.latent_diffusion import Constraint, LatentDiffusion
from radsynth.generators.maisi import MaisiAutoencoder, MaisiControlNet, MaisiUNet
from radsynth.generators.mask_generator import RadsynthMaskGenerator
from radsynth.generators.objectives import TrainingObjective, build_inference_scheduler
from radsynth.generators.stable_diffusion import StableDiffusionAutoencoder, StableDiffusionUNet
from radsynth.generators.text_encoder import PretrainedTextEncoder, RadsynthTextEncoder
from radsynth.generators.unet import RadsynthUNet

OUTPUT_TYPES = ("np", "pt", "physical")
# Folder = component name. Not "controlnet": diffusers takes a folder of that name for its own pipeline.
CONTROLNET_FOLDER, MASK_GENERATOR_FOLDER = "mask_controlnet", "mask_generator"
DIFFUSERS_ENTRY = "pipeline"  # the module diffusers' custom-pipeline loading reads from a model folder
# The classes each extra component may be (its config.json's _class_name picks one; nothing else is imported).
_EXTRA_COMPONENTS = {CONTROLNET_FOLDER: ((RadsynthControlNet, MaisiControlNet), "train with conditioning.use_masks: true"),
                     MASK_GENERATOR_FOLDER: ((RadsynthMaskGenerator,), "train with mask_generator.enabled: true")}
Conditions = Sequence[Mapping[str, object]]


@dataclass
class RadsynthPipelineOutput(BaseOutput):
    """images: (B, 1, *image_shape), numpy for "np"/"physical", a tensor for "pt".

    latent_std: standard deviation of the final latents, a health check: training latents have about 1.0 after
    scaling, and a sampler that drifts (several times that) produces noise however good the decoder is.
    """

    images: np.ndarray | torch.Tensor
    latent_std: float


class RadsynthPipeline(DiffusionPipeline):
    """The base model, the optional mask models, the image space, and the steps the task pipelines compose.

    objective: what the denoiser was trained to predict, saved with the model (None: read off the saved
    scheduler, for folders written before it was recorded); samplers are built from it, never from a config.
    noise_schedule: the betas it was trained under (``objectives.NOISE_SCHEDULE_KEYS``), set for a model fine-tuned
    from a pretrained base that had its own; None: radsynth's ``NOISE_SCHEDULE``.
    distilled_guidance_scale: set on a distilled student, which learnt the teacher's guided prediction at this
    scale and is sampled without guidance.
    differential_privacy: set on a model fine-tuned by DP-SGD (``PrivacyPlan.summary``): the (epsilon, delta) spent
    per patient and the mechanism; every sample's sidecar carries it into the release.
    """

    _optional_components = [CONTROLNET_FOLDER, MASK_GENERATOR_FOLDER]
    model_cpu_offload_seq = "text_encoder->mask_generator->mask_controlnet->unet->vae"
    required_components: tuple[str, ...] = ()  # what a task needs beyond the base model

    # diffusers reads a pipeline's components and config from this signature: every name is spelled out once.
    # The component annotations are what diffusers' from_pipe matches components on.
    def __init__(self, unet: RadsynthUNet | StableDiffusionUNet | MaisiUNet,
                 vae: RadsynthAutoencoder | StableDiffusionAutoencoder | MaisiAutoencoder,
                 text_encoder: RadsynthTextEncoder | PretrainedTextEncoder, scheduler: SchedulerMixin,
                 mask_controlnet: RadsynthControlNet | MaisiControlNet | None = None,
                 mask_generator: RadsynthMaskGenerator | None = None,
                 modality: str = "xray", spatial_dims: int = 2, image_shape: tuple[int, ...] | list[int] = (64, 64),
                 spacing: tuple[float, ...] | list[float] = (1.0, 1.0), intensity_low: float = 0.0,
                 intensity_high: float = 1.0, latent_clip: float | None = None, class_attribute: str | None = None,
                 class_names: tuple[str, ...] | list[str] = (), objective: str | None = None,
                 num_train_timesteps: int | None = None, distilled_guidance_scale: float | None = None,
                 noise_schedule: dict | None = None, differential_privacy: dict | None = None):
        super().__init__()
        if not set(modality_parts(modality)) <= set(MODALITIES):
            raise ValueError(f"modality must be one of {MODALITIES} (or several joined by '+'), got {modality!r}")
        if len(image_shape) != spatial_dims or len(spacing) != spatial_dims:
            raise ValueError(
                f"image_shape {tuple(image_shape)} and spacing {tuple(spacing)} need {spatial_dims} entries each")
        if not intensity_high > intensity_low:
            raise ValueError(f"intensity_high ({intensity_high}) must exceed intensity_low ({intensity_low})")
        if latent_clip is not None and not latent_clip > 0:
            raise ValueError(f"latent_clip must be positive or None, got {latent_clip}")
        if mask_generator is not None and tuple(mask_generator.config.image_shape) != tuple(image_shape):
            raise ValueError(f"the mask generator draws maps of {tuple(mask_generator.config.image_shape)}, the "
                             f"images are {tuple(image_shape)}")
        self.register_modules(unet=unet, vae=vae, text_encoder=text_encoder, scheduler=scheduler,
                              mask_controlnet=mask_controlnet, mask_generator=mask_generator)
        # Tuples in, lists out of model_index.json: normalise so a loaded pipeline's config equals the saved one.
        self.register_to_config(
            modality=modality, spatial_dims=int(spatial_dims), image_shape=tuple(int(s) for s in image_shape),
            spacing=tuple(float(s) for s in spacing), intensity_low=float(intensity_low),
            intensity_high=float(intensity_high), latent_clip=None if latent_clip is None else float(latent_clip),
            class_attribute=class_attribute, class_names=tuple(class_names),
            objective=objective or _objective_of_scheduler(scheduler),
            num_train_timesteps=int(num_train_timesteps or scheduler.config.num_train_timesteps),
            distilled_guidance_scale=None if distilled_guidance_scale is None else float(distilled_guidance_scale),
            noise_schedule=None if noise_schedule is None else dict(noise_schedule),
            differential_privacy=None if differential_privacy is None else dict(differential_privacy))

    @classmethod
    def from_model_dir(cls, folder: str | Path, optional: Sequence[str] = (), **components) -> RadsynthPipeline:
        """A trained model folder with the components this task needs (``required_components``) beside the base,
        and those of ``optional`` that the folder has. A UNet that reads label maps stands in for the ControlNet.

        Loaded plainly: low_cpu_mem_usage builds modules under accelerate's init_empty_weights, which patches
        torch.nn.Module for the whole process, so shards loading side by side on threads land on the meta device.
        """
        folder = Path(folder)
        present = [name for name in optional if (folder / name / "config.json").is_file()]
        for name in (*cls.required_components, *present):
            if name in components or (name == CONTROLNET_FOLDER and unet_reads_label_maps(folder)):
                continue
            kinds, how = _EXTRA_COMPONENTS[name]
            if not (folder / name / "config.json").is_file():
                raise FileNotFoundError(f"{folder} has no {name}: {how}")
            saved = json.loads((folder / name / "config.json").read_text()).get("_class_name")
            kind = next((kind for kind in kinds if kind.__name__ == saved), None)
            if kind is None:
                raise ValueError(f"{folder / name} holds a {saved}, not one of {[kind.__name__ for kind in kinds]}")
            components[name] = kind.from_pretrained(folder / name, use_safetensors=True, low_cpu_mem_usage=False)
        return cls.from_pretrained(folder, use_safetensors=True, low_cpu_mem_usage=False, **components)

    # ------------------------------------------------------------------------------------------ saving

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        """diffusers' folder, plus the file that lets diffusers alone load it (``diffusers_entry``)."""
        super().save_pretrained(save_directory, **kwargs)
        folder = Path(save_directory)
        shutil.copyfile(Path(__file__).with_name("diffusers_entry.py"), folder / f"{DIFFUSERS_ENTRY}.py")
        index = json.loads((folder / "model_index.json").read_text())
        index["_class_name"] = [DIFFUSERS_ENTRY, type(self).__name__]
        (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load_config(cls, *args, **kwargs):
        """The saved config with the class name alone: diffusers runs the folder's ``pipeline.py`` when the index
        names it, which radsynth never does (the folder is user-writable; the class is already this one)."""
        loaded = super().load_config(*args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        if isinstance(config.get("_class_name"), list):
            config["_class_name"] = config["_class_name"][1]
        return loaded

    # ------------------------------------------------------------------------------------------ the model

    @property
    def objective(self) -> TrainingObjective:
        return TrainingObjective(self.config.objective, self.config.num_train_timesteps,
                                 noise_schedule=self.config.noise_schedule)

    def diffusion(self, controlnet: torch.nn.Module | None = None, conditioning_scale: float = 1.0,
                  loss_weights: Callable | None = None) -> LatentDiffusion:
        """The image model's core; a ``controlnet`` (the model's ``mask_controlnet``, or one in training) steers it
        at ``conditioning_scale``. loss_weights: training's (``LatentDiffusion``)."""
        return LatentDiffusion(self.unet, self.vae, self.text_encoder, self.objective, controlnet=controlnet,
                               conditioning_scale=conditioning_scale, class_attribute=self.config.class_attribute,
                               class_names=self.config.class_names, latent_clip=self.config.latent_clip,
                               spacing=self.config.spacing, loss_weights=loss_weights)

    def base_scheduler(self, name: str | None = None):
        """A fresh scheduler of the base objective's kind (a distilled student's own scheduler cannot run the mask
        generator, which is not distilled): ``name``, or DDIM / FlowMatchEuler."""
        default = "flow_match_euler" if self.objective.is_flow else "ddim"
        return build_inference_scheduler(self.config.objective, name or default, self.config.num_train_timesteps,
                                         self.config.noise_schedule)

    # ------------------------------------------------------------------------------------------ the steps

    def check_prompts(self, prompts: str | Sequence[str], generator=None,
                      conditions: Conditions | None = None) -> list[str]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        if isinstance(generator, list) and len(generator) != len(prompts):
            raise ValueError(f"got {len(generator)} generators for {len(prompts)} prompts")
        if conditions is not None and len(conditions) != len(prompts):
            raise ValueError(f"got {len(conditions)} conditions for {len(prompts)} prompts")
        return prompts

    def latent_shape(self, batch_size: int) -> tuple[int, ...]:
        factor = self.vae.downsample_factor
        if any(size % factor for size in self.config.image_shape):
            raise ValueError(
                f"image_shape {self.config.image_shape} is not divisible by the autoencoder's factor {factor}")
        return (batch_size, self.vae.latent_channels, *(size // factor for size in self.config.image_shape))

    def prepare_latents(self, batch_size: int, generator, latents: torch.Tensor | None, scheduler) -> torch.Tensor:
        shape, device, dtype = self.latent_shape(batch_size), self._execution_device, self.unet.dtype
        if latents is None:
            # A list of generators gives each sample its own seed (randn_tensor draws row by row), so one
            # sample can be regenerated exactly without the rest of its batch.
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        return latents.to(device=device, dtype=dtype) * getattr(scheduler, "init_noise_sigma", 1.0)

    def draw(self, prompts: list[str], conditions: Conditions | None = None, *, num_inference_steps: int,
             guidance_scale: float, guidance_interval: tuple[float, float] | None = None, generator=None,
             latents: torch.Tensor | None = None, label_maps: torch.Tensor | None = None,
             conditioning_scale: float = 1.0, constrain: Constraint | None = None) -> tuple[torch.Tensor, float]:
        """Latents drawn under the prompts (and label maps, through the ControlNet): (latents, their std).
        guidance_interval: the noise levels (fractions of the training schedule) where guidance applies; None:
        every step (``LatentDiffusion.sample``)."""
        diffusion = self.diffusion(self.mask_controlnet if label_maps is not None else None, conditioning_scale)
        condition = diffusion.condition(prompts, conditions=conditions, label_maps=label_maps)
        latents = self.prepare_latents(len(prompts), generator, latents, self.scheduler)
        self.scheduler.set_timesteps(num_inference_steps, device=self._execution_device)
        latents = diffusion.sample(latents, condition, self.scheduler, self.progress_bar(self.scheduler.timesteps),
                                   guidance_scale=guidance_scale, guidance_interval=guidance_interval,
                                   generator=generator, constrain=constrain)
        return latents, float(latents.float().std())

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1]: the decoder is not bounded, so it is clipped to the range training images had."""
        return self.vae.decode(latents.to(self.vae.dtype)).float().clamp(-1.0, 1.0)

    def finish(self, images: torch.Tensor, output_type: str) -> np.ndarray | torch.Tensor:
        self.maybe_free_model_hooks()
        if output_type == "pt":
            return images
        images = images.cpu().numpy()
        return self.to_physical(images) if output_type == "physical" else images

    def to_physical(self, images: np.ndarray) -> np.ndarray:
        """[-1, 1] -> physical units: the inverse of the preprocessing intensity map (IntensityMap.inverse)."""
        low, high = self.config.intensity_low, self.config.intensity_high
        return ((np.asarray(images, dtype=np.float32) + 1.0) / 2.0 * (high - low) + low).astype(np.float32)


def unet_reads_label_maps(folder: str | Path) -> bool:
    """Whether a model folder's UNet reads label maps itself (``conditioning.mask_input: concat``): its pairs need no
    ControlNet."""
    unet_config = Path(folder) / "unet" / "config.json"
    return unet_config.is_file() and bool(json.loads(unet_config.read_text()).get("label_channels"))


def check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")


def _objective_of_scheduler(scheduler) -> str:
    """The objective a model folder from before it was recorded was trained with: its saved scheduler was built
    from the training config, so FlowMatchEuler means rectified flow and the others carry the prediction type."""
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return "rectified_flow"
    return scheduler.config.prediction_type


def model_hash(pipeline: DiffusionPipeline) -> str:
    """sha256 over every model component's config and weights (names, dtypes, shapes, bytes), in name order.

    It identifies the trained model, so it is the same in memory, after save_pretrained and after
    from_pretrained, and changes with any weight. The scheduler and the pipeline's own config are sampling
    choices, recorded separately in each sample's sidecar, and are not part of it.
    """
    return modules_hash(pipeline.components)


def modules_hash(components: Mapping[str, object]) -> str:
    """``model_hash`` of named modules (anything else among them is skipped): a model outside a pipeline too."""
    digest = hashlib.sha256()
    for name, component in sorted(components.items()):
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

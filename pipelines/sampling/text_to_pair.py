"""Text-to-pair: prompt (+ a label map, or lesion edits) -> label map -> image, on one grid.

The mask generator draws a label map for each prompt (unless the caller gives one), the lesion requests edit
it, and the mask-to-image model draws the image the map describes. The map and the image share the image
grid, so they are a pair with identical geometry; each comes with what it was made from (``mask_sources``,
``lesions``) for its sidecar. A generated map is new: nothing of a real case is in it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from radsynth.generators.controlnet import RadsynthControlNet
from radsynth.generators.mask_generator import RadsynthMaskGenerator

from ..masks import Orientation, apply_lesion_edit, default_orientation, parse_lesion_request
from .mask_to_image import RadsynthMaskToImagePipeline
from .text_to_image import RadsynthPipelineOutput, RadsynthTextToImagePipeline

MASK_GENERATOR_FOLDER = "mask_generator"


@dataclass
class RadsynthPairOutput(RadsynthPipelineOutput):
    """images as ``RadsynthPipelineOutput``; label_maps (B, 1, *image_shape) int64 on the same grid.

    mask_sources: "generated" (mask generator) or "user" (given by the caller), per pair.
    lesions: per pair, the records of the lesion edits applied to its map (``LesionEditRecord.to_dict``).
    """

    label_maps: np.ndarray | None = None
    mask_sources: list[str] | None = None
    lesions: list[list[dict]] | None = None


class RadsynthTextToPairPipeline(RadsynthMaskToImagePipeline):
    """``RadsynthMaskToImagePipeline`` plus a ``mask_generator`` that draws the label maps from the prompts."""

    model_cpu_offload_seq = "text_encoder->mask_generator->mask_controlnet->unet->vae"

    def __init__(self, unet, vae, text_encoder, scheduler, mask_controlnet, mask_generator, modality: str = "xray",
                 spatial_dims: int = 2, image_shape: tuple[int, ...] | list[int] = (64, 64),
                 spacing: tuple[float, ...] | list[float] = (1.0, 1.0), intensity_low: float = 0.0,
                 intensity_high: float = 1.0, latent_clip: float | None = None, class_attribute: str | None = None,
                 class_names: tuple[str, ...] | list[str] = ()):
        super().__init__(unet, vae, text_encoder, scheduler, mask_controlnet, modality=modality,
                         spatial_dims=spatial_dims, image_shape=image_shape, spacing=spacing,
                         intensity_low=intensity_low, intensity_high=intensity_high, latent_clip=latent_clip,
                         class_attribute=class_attribute, class_names=class_names)
        if tuple(mask_generator.config.image_shape) != tuple(self.config.image_shape):
            raise ValueError(f"the mask generator draws maps of {tuple(mask_generator.config.image_shape)}, the "
                             f"images are {tuple(self.config.image_shape)}")
        self.register_modules(mask_generator=mask_generator)

    @classmethod
    def from_model_dir(cls, folder: str | Path) -> RadsynthTextToPairPipeline:
        """A trained model folder with its ``mask_controlnet`` and ``mask_generator`` beside the base."""
        folder = Path(folder)
        if not (folder / MASK_GENERATOR_FOLDER / "config.json").is_file():
            raise FileNotFoundError(f"{folder} has no {MASK_GENERATOR_FOLDER}: train with mask_generator.enabled")
        mask_pipeline = RadsynthMaskToImagePipeline.from_model_dir(folder)
        generator = RadsynthMaskGenerator.from_pretrained(folder / MASK_GENERATOR_FOLDER, use_safetensors=True,
                                                          low_cpu_mem_usage=False)
        return cls.from_parts(mask_pipeline, mask_pipeline.mask_controlnet, generator)

    @classmethod
    def from_parts(cls, pipeline: RadsynthTextToImagePipeline, mask_controlnet: RadsynthControlNet,
                   mask_generator: RadsynthMaskGenerator) -> RadsynthTextToPairPipeline:
        return cls.from_text_to_image(pipeline, mask_controlnet, mask_generator=mask_generator)

    @property
    def orientation(self) -> Orientation:
        """Where patient-right and superior lie on the grid (the training maps'), for lesion requests."""
        stored = self.mask_generator.config.get("orientation")
        return Orientation(**stored) if stored else default_orientation(self.config.spatial_dims)

    @torch.no_grad()
    def generate_label_maps(self, prompts: list[str], generator=None, num_inference_steps: int = 50,
                            guidance_scale: float = 3.0) -> torch.Tensor:
        """One label map per prompt from the mask generator: (B, 1, *image_shape) int64."""
        guided, device = guidance_scale > 1.0, self._execution_device
        model = self.mask_generator
        context = self.encode_prompts(prompts, guided).to(device=device, dtype=model.dtype)
        class_labels = self.class_labels_for(prompts, guided)
        class_labels = class_labels.to(device) if class_labels is not None else None
        spacing = None
        if model.config.use_spacing:
            spacing = torch.tensor(self.config.spacing, device=device).expand(context.shape[0], -1)
        # Its own copy of the scheduler: the image's sampling starts from a clean scheduler state after this.
        scheduler = copy.deepcopy(self.scheduler)
        scheduler.set_timesteps(num_inference_steps, device=device)
        shape = (len(prompts), model.num_labels, *model.grid_shape)
        noise = randn_tensor(shape, generator=generator, device=device, dtype=model.dtype)
        shares = self.denoise(noise * getattr(scheduler, "init_noise_sigma", 1.0), scheduler.timesteps, context,
                              class_labels, spacing, guidance_scale, self._step_kwargs(generator),
                              scheduler=scheduler, denoiser=model, latent_clip=1.0)
        return model.decode(shares)

    @torch.no_grad()
    def __call__(self, prompts: str | list[str], label_maps: torch.Tensor | np.ndarray | None = None,
                 lesions: Sequence[str] = (), conditioning_scale: float = 1.0,
                 num_inference_steps: int = 50, guidance_scale: float = 3.0, generator=None,
                 output_type: str = "np", return_dict: bool = True) -> RadsynthPairOutput | tuple:
        """One image + label map per prompt.

        label_maps: the caller's maps (B, 1, *image_shape) instead of generated ones.
        lesions: requests applied to every map in turn, e.g. "nodule 8 mm in right lung" (``masks`` grammar);
            the edits' random draws (size within a range, position) come from each prompt's generator.
        generator: one per prompt makes each pair reproducible on its own (map noise, edits, image noise).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if label_maps is None:
            maps = self.generate_label_maps(prompts, generator, num_inference_steps, guidance_scale).cpu().numpy()
            sources = ["generated"] * len(prompts)
        else:
            maps = np.asarray(label_maps.cpu() if torch.is_tensor(label_maps) else label_maps).astype(np.int64)
            sources = ["user"] * len(prompts)
        vocabulary = self.mask_generator.label_vocabulary
        requests = [parse_lesion_request(text, vocabulary) for text in lesions]
        generators = generator if isinstance(generator, list) else [generator] * len(prompts)
        edits: list[list[dict]] = []
        for i, sample_generator in enumerate(generators):
            rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=sample_generator)))
            records = []
            for request in requests:
                maps[i, 0], record = apply_lesion_edit(maps[i, 0], self.config.spacing, request, vocabulary, rng,
                                                       orientation=self.orientation)
                records.append(record.to_dict())
            edits.append(records)
        output = super().__call__(prompts, maps, conditioning_scale=conditioning_scale,
                                  num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                  generator=generator, output_type=output_type)
        if not return_dict:
            return output.images, maps, output.latent_std
        return RadsynthPairOutput(images=output.images, latent_std=output.latent_std, label_maps=maps,
                                  mask_sources=sources, lesions=edits)


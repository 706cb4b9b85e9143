"""Text-to-pair: prompt (+ a label map, or lesion edits) -> label map -> image, on one grid.

The mask generator draws a label map for each prompt (unless the caller gives one), the lesion requests edit
it, and the ControlNet-steered model draws the image the map describes. The map and the image share the image
grid, so they are a pair with identical geometry; each comes with what it was made from (``mask_sources``,
``lesions``) for its sidecar. A generated map is new: nothing of a real case is in it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from radsynth.generators.latent_diffusion import LatentDiffusion

from ..masks import Orientation, apply_lesion_edit, default_orientation, parse_lesion_request
from .mask_to_image import as_label_maps
from .pipeline import (
    CONTROLNET_FOLDER,
    MASK_GENERATOR_FOLDER,
    Conditions,
    RadsynthPipeline,
    RadsynthPipelineOutput,
    check_output_type,
)

# Label shares live in [-1, 1] (see RadsynthMaskGenerator.encode): the sampler keeps their implied clean value there.
SHARE_CLIP = 1.0


def mask_generator_diffusion(base: RadsynthPipeline, mask_generator: torch.nn.Module,
                             loss_weights: Callable[[torch.Tensor, object], torch.Tensor] | None = None
                             ) -> LatentDiffusion:
    """The mask generator's core: label shares are its own latents, under the base model's (frozen) text encoder,
    its class vocabulary and its objective. loss_weights: training's (``LabelLossWeights``)."""
    return LatentDiffusion(mask_generator, mask_generator, base.text_encoder, base.objective,
                           class_attribute=base.config.class_attribute, class_names=base.config.class_names,
                           latent_clip=SHARE_CLIP, spacing=base.config.spacing, loss_weights=loss_weights)


@dataclass
class RadsynthPairOutput(RadsynthPipelineOutput):
    """images as ``RadsynthPipelineOutput``; label_maps (B, 1, *image_shape) int64 on the same grid.

    mask_sources: "generated" (mask generator) or "user" (given by the caller), per pair.
    lesions: per pair, the records of the lesion edits applied to its map (``LesionEditRecord.to_dict``).
    """

    label_maps: np.ndarray | None = None
    mask_sources: list[str] | None = None
    lesions: list[list[dict]] | None = None


class RadsynthTextToPairPipeline(RadsynthPipeline):
    """The base model with its ``mask_controlnet`` and the ``mask_generator`` that draws maps from prompts."""

    required_components = (CONTROLNET_FOLDER, MASK_GENERATOR_FOLDER)

    @property
    def orientation(self) -> Orientation:
        """Where patient-right and superior lie on the grid (the training maps'), for lesion requests."""
        stored = self.mask_generator.config.get("orientation")
        return Orientation(**stored) if stored else default_orientation(self.config.spatial_dims)

    @torch.no_grad()
    def generate_label_maps(self, prompts: list[str], conditions: Conditions | None = None, generator=None,
                            num_inference_steps: int = 50, guidance_scale: float = 3.0) -> torch.Tensor:
        """One label map per prompt from the mask generator: (B, 1, *image_shape) int64.

        A distilled student's mask generator is not distilled: it runs the base objective's sampler with the
        guidance the student learnt, at ``num_inference_steps``.
        """
        distilled = self.config.distilled_guidance_scale
        # Its own scheduler: the image's sampling starts from a clean scheduler state after this.
        scheduler = copy.deepcopy(self.scheduler) if distilled is None else self.base_scheduler()
        guidance = guidance_scale if distilled is None else distilled
        scheduler.set_timesteps(num_inference_steps, device=self._execution_device)
        diffusion = mask_generator_diffusion(self, self.mask_generator)
        condition = diffusion.condition(prompts, conditions=conditions)
        shape = (len(prompts), self.mask_generator.num_labels, *self.mask_generator.grid_shape)
        noise = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=self.mask_generator.dtype)
        shares = diffusion.sample(noise * getattr(scheduler, "init_noise_sigma", 1.0), condition, scheduler,
                                  guidance_scale=guidance, generator=generator)
        return self.mask_generator.decode(shares)

    @torch.no_grad()
    def __call__(self, prompts: str | list[str], label_maps: torch.Tensor | np.ndarray | None = None,
                 lesions: Sequence[str] = (), conditions: Conditions | None = None, conditioning_scale: float = 1.0,
                 num_inference_steps: int = 50, guidance_scale: float = 3.0,
                 guidance_interval: tuple[float, float] | None = None, generator=None,
                 mask_inference_steps: int | None = None, mask_guidance_scale: float | None = None,
                 output_type: str = "np", return_dict: bool = True) -> RadsynthPairOutput | tuple:
        """One image + label map per prompt.

        label_maps: the caller's maps (B, 1, *image_shape) instead of generated ones.
        lesions: requests applied to every map in turn, e.g. "nodule 8 mm in right lung" (``masks`` grammar);
            the edits' random draws (size within a range, position) come from each prompt's generator.
        generator: one per prompt makes each pair reproducible on its own (map noise, edits, image noise).
        mask_inference_steps: the mask generator's steps (default ``num_inference_steps``).
        mask_guidance_scale: the mask generator's guidance (default ``guidance_scale``; a distilled student's maps
            keep the guidance it learnt). guidance_interval applies to the images, not the maps.
        """
        prompts = self.check_prompts(prompts, generator, conditions)
        check_output_type(output_type)
        if label_maps is None:
            maps = self.generate_label_maps(
                prompts, conditions, generator, mask_inference_steps or num_inference_steps,
                guidance_scale if mask_guidance_scale is None else mask_guidance_scale).cpu().numpy()
            sources = ["generated"] * len(prompts)
        else:
            maps = as_label_maps(label_maps, len(prompts), self.config.image_shape).cpu().numpy()
            sources = ["user"] * len(prompts)
        edits = self.edit_lesions(maps, lesions, generator)
        latents, latent_std = self.draw(prompts, conditions, num_inference_steps=num_inference_steps,
                                        guidance_scale=guidance_scale, guidance_interval=guidance_interval,
                                        generator=generator, label_maps=torch.from_numpy(maps),
                                        conditioning_scale=conditioning_scale)
        images = self.finish(self.decode(latents), output_type)
        if not return_dict:
            return images, maps, latent_std
        return RadsynthPairOutput(images=images, latent_std=latent_std, label_maps=maps, mask_sources=sources,
                                  lesions=edits)

    def edit_lesions(self, maps: np.ndarray, lesions: Sequence[str], generator) -> list[list[dict]]:
        """Apply every request to every map in place; the records of the edits, per map."""
        vocabulary = self.mask_generator.label_vocabulary
        requests = [parse_lesion_request(text, vocabulary) for text in lesions]
        generators = generator if isinstance(generator, list) else [generator] * len(maps)
        edits: list[list[dict]] = []
        for i, sample_generator in enumerate(generators):
            rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=sample_generator)))
            records = []
            for request in requests:
                maps[i, 0], record = apply_lesion_edit(maps[i, 0], self.config.spacing, request, vocabulary, rng,
                                                       orientation=self.orientation)
                records.append(record.to_dict())
            edits.append(records)
        return edits

"""Image-to-image translation between modalities (CT -> MRI, MRI -> CT) with one model that knows both.

Dual diffusion implicit bridges (Su et al., ICLR 2023) on radsynth's own latent diffusion: the source image is
encoded, walked deterministically up the model's probability-flow path under the *source* prompt (its modality)
to ``strength`` of the schedule, and walked back down under the *target* prompt. The walk up is the inversion of
the walk down, so what the source prompt explains (anatomy, layout) is kept in the intermediate latents while the
target prompt redraws what depends on the modality (tissue contrast, texture). ``strength`` 1 goes to pure noise
(the full bridge: least of the source kept); smaller values keep more of it.

With label maps (the source case's labels) the model's ControlNet steers both walks, so the translated image keeps
the anatomy the labels describe and makes a pair with them. Every output is derived from a real image when its
source is; the caller records it so.
"""

from __future__ import annotations

import numpy as np
import torch

from .mask_to_image import as_label_maps
from .pipeline import Conditions, RadsynthPipeline, RadsynthPipelineOutput, check_output_type


class RadsynthTranslationPipeline(RadsynthPipeline):
    """A multi-modality base (``modality`` "ct+mri") and, for label-steered translation, its ``mask_controlnet``."""

    @torch.no_grad()
    def __call__(self, images: torch.Tensor | np.ndarray, source_prompts: str | list[str],
                 target_prompts: str | list[str], label_maps: torch.Tensor | np.ndarray | None = None,
                 source_conditions: Conditions | None = None, target_conditions: Conditions | None = None,
                 strength: float = 0.6, num_inference_steps: int = 50, guidance_scale: float = 1.5,
                 conditioning_scale: float = 1.0, output_type: str = "np") -> RadsynthPipelineOutput:
        """One translated image per source image.

        images: source images (B, 1, *image_shape) in [-1, 1] (the preprocessed cache's range).
        source_prompts / target_prompts: each image's prompt in its own modality and in the one to translate to
            (the same attributes, another ``modality``); conditions as ``RadsynthTextToImagePipeline``.
        label_maps: integer maps (B, 1, *image_shape) of the source images, steering both walks through the
            ControlNet; None: text alone.
        strength: how far up the schedule the source is walked (0 < strength <= 1).
        num_inference_steps: steps of the full schedule; each walk takes ``strength`` of them (at least one).
        guidance_scale: classifier-free guidance on the walk down (the walk up is unguided, so that it inverts
            the model's own path); deterministic throughout: no generator.
        """
        source_prompts = self.check_prompts(source_prompts, None, source_conditions)
        target_prompts = self.check_prompts(target_prompts, None, target_conditions)
        check_output_type(output_type)
        shape = (len(source_prompts), 1, *self.config.image_shape)
        images = torch.as_tensor(np.asarray(images.cpu() if torch.is_tensor(images) else images), dtype=torch.float32)
        if tuple(images.shape) != shape or len(target_prompts) != len(source_prompts):
            raise ValueError(f"images must have shape {shape} with one source and one target prompt each, got "
                             f"{tuple(images.shape)}, {len(source_prompts)} and {len(target_prompts)} prompts")
        maps = None if label_maps is None else as_label_maps(label_maps, len(source_prompts), self.config.image_shape)
        diffusion = self.diffusion(self.mask_controlnet if maps is not None else None, conditioning_scale)
        source = diffusion.condition(source_prompts, conditions=source_conditions, label_maps=maps)
        target = diffusion.condition(target_prompts, conditions=target_conditions, label_maps=maps)
        path = self.objective.path_timesteps(strength, max(1, round(strength * num_inference_steps)))
        latents = diffusion.travel(diffusion.encode(images.to(self._execution_device)), source, path)
        latents = diffusion.travel(latents, target, path.flip(0), guidance_scale=guidance_scale, land_clean=True)
        images = self.finish(self.decode(latents), output_type)
        return RadsynthPipelineOutput(images=images, latent_std=float(latents.float().std()))

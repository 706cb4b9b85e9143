"""Mask-to-image: a label map (and text) -> an image, a ControlNet steering the frozen text-to-image model.

The label map uses the dataset's own vocabulary at image resolution and the image comes out on the same grid,
so the two make a pair with identical geometry. Guidance stays over text: both halves of a guided batch see
the map, which is the control rather than the condition being guided.
"""

from __future__ import annotations

import numpy as np
import torch

from .pipeline import CONTROLNET_FOLDER, Conditions, RadsynthPipeline, RadsynthPipelineOutput, check_output_type


def as_label_maps(label_maps: torch.Tensor | np.ndarray, batch_size: int, image_shape) -> torch.Tensor:
    """Integer maps (B, 1, *image_shape), one per prompt, on the image grid; anything else is refused."""
    maps = torch.as_tensor(np.asarray(label_maps) if not torch.is_tensor(label_maps) else label_maps)
    expected = (batch_size, 1, *image_shape)
    if tuple(maps.shape) != expected:
        raise ValueError(f"label_maps must have shape {expected} (one per prompt, on the image grid), "
                         f"got {tuple(maps.shape)}")
    return maps.long()


class RadsynthMaskToImagePipeline(RadsynthPipeline):
    """The base model with its ``mask_controlnet``: ``__call__`` also takes the label maps."""

    required_components = (CONTROLNET_FOLDER,)

    @torch.no_grad()
    def __call__(self, prompts: str | list[str], label_maps: torch.Tensor | np.ndarray,
                 conditions: Conditions | None = None, conditioning_scale: float = 1.0, num_inference_steps: int = 50,
                 guidance_scale: float = 3.0, guidance_interval: tuple[float, float] | None = None, generator=None,
                 latents: torch.Tensor | None = None, output_type: str = "np",
                 return_dict: bool = True) -> RadsynthPipelineOutput | tuple:
        """One image per prompt, each on its label map's grid.

        label_maps: integer labels (B, 1, *image_shape) in 0..num_labels-1, one per prompt.
        conditioning_scale: 0 gives the text-to-image model's image; 1 is what the ControlNet trained at.
        Other arguments as ``RadsynthTextToImagePipeline.__call__``.
        """
        prompts = self.check_prompts(prompts, generator, conditions)
        check_output_type(output_type)
        maps = as_label_maps(label_maps, len(prompts), self.config.image_shape)
        latents, latent_std = self.draw(prompts, conditions, num_inference_steps=num_inference_steps,
                                        guidance_scale=guidance_scale, guidance_interval=guidance_interval,
                                        generator=generator, latents=latents, label_maps=maps,
                                        conditioning_scale=conditioning_scale)
        images = self.finish(self.decode(latents), output_type)
        if not return_dict:
            return images, latent_std
        return RadsynthPipelineOutput(images=images, latent_std=latent_std)

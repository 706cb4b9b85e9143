"""Lesion inpainting (LeFusion-style): a lesion generated into a real image, everything else kept.

The real image is encoded once. At every denoising step the latents outside the region being generated are
replaced by the real latents noised to that step (latent blending, the RePaint idea in latent space), so the
new content is drawn to fit the real anatomy around it; after the last step they are the real latents. The
ControlNet sees the edited label map, so the lesion takes the shape and place the map gives it.

The decoder cannot reproduce a real image exactly, so the decoded sample is pasted back only inside the
region (the lesion's voxels grown by ``margin`` voxels, a rim where the lesion's edge blends in): outside it
the output is the real image, value for value. Such an output carries a patient's image and is derived from
that case; the caller records it so (``derived_from_real``, the source case id).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
from scipy import ndimage

from .mask_to_image import as_label_maps
from .pipeline import CONTROLNET_FOLDER, Conditions, RadsynthPipeline, RadsynthPipelineOutput, check_output_type


class RadsynthLesionInpaintPipeline(RadsynthPipeline):
    """The base model with its ``mask_controlnet``, regenerating only an inpaint region of given real images."""

    required_components = (CONTROLNET_FOLDER,)

    def inpaint_region(self, regions: torch.Tensor, margin: int) -> torch.Tensor:
        """The voxels to regenerate: ``regions`` grown by ``margin`` voxels (a rim to blend the edge into)."""
        if margin == 0:
            return regions
        structure = ndimage.iterate_structure(ndimage.generate_binary_structure(self.config.spatial_dims, 1), margin)
        grown = [ndimage.binary_dilation(region[0], structure) for region in regions.cpu().numpy()]
        return torch.as_tensor(np.stack(grown)[:, None])

    def latent_region(self, region: torch.Tensor) -> torch.Tensor:
        """Latent voxels whose footprint touches the region, grown by one: the latents that are regenerated."""
        pool = (F.max_pool2d, F.max_pool3d)[self.config.spatial_dims - 2]
        factor = self.vae.downsample_factor
        coarse = pool(region.float(), factor)
        return pool(coarse, 3, stride=1, padding=1)

    @torch.no_grad()
    def __call__(self, prompts: str | list[str], images: torch.Tensor | np.ndarray,
                 label_maps: torch.Tensor | np.ndarray, regions: torch.Tensor | np.ndarray, margin: int = 2,
                 conditions: Conditions | None = None, conditioning_scale: float = 1.0, num_inference_steps: int = 50,
                 guidance_scale: float = 3.0, guidance_interval: tuple[float, float] | None = None, generator=None,
                 output_type: str = "np") -> RadsynthPipelineOutput:
        """One image per prompt: ``images`` with new content inside ``regions``.

        images: real images (B, 1, *image_shape) in [-1, 1] (the preprocessed cache's range).
        label_maps: the maps to draw from (with the lesion edits), as for ``RadsynthMaskToImagePipeline``.
        regions: booleans (B, 1, *image_shape), the voxels to generate (the edited lesion's).
        margin: voxels the region grows by before pasting; outside region + margin the real image is kept.
        """
        prompts = self.check_prompts(prompts, generator, conditions)
        check_output_type(output_type)
        shape = (len(prompts), 1, *self.config.image_shape)
        images, regions = (torch.as_tensor(np.asarray(x.cpu() if torch.is_tensor(x) else x)) for x in (images, regions))
        if tuple(images.shape) != shape or tuple(regions.shape) != shape:
            raise ValueError(f"images and regions must have shape {shape}, got {tuple(images.shape)} and "
                             f"{tuple(regions.shape)}")
        maps = as_label_maps(label_maps, len(prompts), self.config.image_shape)
        region = self.inpaint_region(regions.bool(), margin)
        device, objective = self._execution_device, self.objective
        known = self.diffusion().encode(images)
        keep_new = self.latent_region(region).to(device=device, dtype=known.dtype)
        # One noise draw per image, from its own generator when given a list: each output reproduces alone.
        noise = randn_tensor(known.shape, generator=generator, device=device, dtype=known.dtype)

        def keep_background(latents: torch.Tensor, timestep: torch.Tensor | None) -> torch.Tensor:
            background = known if timestep is None else objective.noised(known, noise, timestep)
            return keep_new * latents + (1.0 - keep_new) * background

        latents, latent_std = self.draw(prompts, conditions, num_inference_steps=num_inference_steps,
                                        guidance_scale=guidance_scale, guidance_interval=guidance_interval,
                                        generator=generator, label_maps=maps,
                                        conditioning_scale=conditioning_scale, constrain=keep_background)
        generated = self.decode(latents)
        pasted = torch.where(region.to(generated.device), generated, images.to(generated))
        return RadsynthPipelineOutput(images=self.finish(pasted, output_type), latent_std=latent_std)

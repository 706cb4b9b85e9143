"""Text-to-image latent diffusion for 2D and 3D medical images, as a diffusers ``DiffusionPipeline``.

prompts (and each sample's attribute values) -> conditioning -> the UNet denoises Gaussian latents under a
diffusers scheduler, with classifier-free guidance -> the autoencoder decodes them -> images in [-1, 1] or in
physical units.
"""

from __future__ import annotations

import torch

from .pipeline import Conditions, RadsynthPipeline, RadsynthPipelineOutput, check_output_type


class RadsynthTextToImagePipeline(RadsynthPipeline):
    """Samples images from prompts with a RadsynthUNet over a RadsynthAutoencoder's latents, 2D or 3D alike."""

    @torch.no_grad()
    def __call__(self, prompts: str | list[str], conditions: Conditions | None = None, num_inference_steps: int = 50,
                 guidance_scale: float = 3.0, guidance_interval: tuple[float, float] | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "np",
                 return_dict: bool = True) -> RadsynthPipelineOutput | tuple:
        """Generate one image per prompt.

        conditions: each prompt's attribute values ({"finding": "nodule", ...}), the source of its class label;
            default: the attribute header of the rendered prompt.
        guidance_scale: classifier-free guidance; <= 1 runs the conditional model alone (half the compute).
        guidance_interval: guide only the steps at these noise levels (fractions of the training schedule, 1 pure
            noise); the others run the conditional model alone. None: every step.
        generator: one generator for the batch, or one per prompt for per-sample reproducibility.
        output_type: "np" / "pt" in [-1, 1], or "physical" (numpy, intensity_low..intensity_high).
        """
        prompts = self.check_prompts(prompts, generator, conditions)
        check_output_type(output_type)
        latents, latent_std = self.draw(prompts, conditions, num_inference_steps=num_inference_steps,
                                        guidance_scale=guidance_scale, guidance_interval=guidance_interval,
                                        generator=generator, latents=latents)
        images = self.finish(self.decode(latents), output_type)
        if not return_dict:
            return images, latent_std
        return RadsynthPipelineOutput(images=images, latent_std=latent_std)

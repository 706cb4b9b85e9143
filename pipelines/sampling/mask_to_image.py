"""Mask-to-image: a label map (and text) -> an image, a ControlNet steering the frozen text-to-image model.

The label map uses the dataset's own vocabulary at image resolution and the image comes out on the same grid,
so the two make a pair with identical geometry. Guidance stays over text: both halves of a guided batch see
the map, which is the control rather than the condition being guided.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import torch

from radsynth.generators.controlnet import RadsynthControlNet, one_hot_labels

from .text_to_image import RadsynthPipelineOutput, RadsynthTextToImagePipeline

CONTROLNET_FOLDER = "mask_controlnet"  # not "controlnet": diffusers takes a folder of that name for its own pipeline


class RadsynthMaskToImagePipeline(RadsynthTextToImagePipeline):
    """``RadsynthTextToImagePipeline`` plus a ``mask_controlnet``; ``__call__`` also takes the label maps."""

    model_cpu_offload_seq = "text_encoder->mask_controlnet->unet->vae"

    # diffusers reads a pipeline's components and config from its __init__ signature: every name is spelled out.
    def __init__(self, unet, vae, text_encoder, scheduler, mask_controlnet, modality: str = "xray",
                 spatial_dims: int = 2, image_shape: tuple[int, ...] | list[int] = (64, 64),
                 spacing: tuple[float, ...] | list[float] = (1.0, 1.0), intensity_low: float = 0.0,
                 intensity_high: float = 1.0, latent_clip: float | None = None, class_attribute: str | None = None,
                 class_names: tuple[str, ...] | list[str] = ()):
        super().__init__(unet, vae, text_encoder, scheduler, modality=modality, spatial_dims=spatial_dims,
                         image_shape=image_shape, spacing=spacing, intensity_low=intensity_low,
                         intensity_high=intensity_high, latent_clip=latent_clip, class_attribute=class_attribute,
                         class_names=class_names)
        self.register_modules(mask_controlnet=mask_controlnet)

    @classmethod
    def from_text_to_image(cls, pipeline: RadsynthTextToImagePipeline, mask_controlnet: RadsynthControlNet,
                           **components) -> RadsynthMaskToImagePipeline:
        """``pipeline``'s models and config with the ControlNet (and a subclass's further ``components``)."""
        arguments = set(inspect.signature(RadsynthTextToImagePipeline.__init__).parameters)
        base = {name: module for name, module in pipeline.components.items() if name in arguments}
        config = {key: value for key, value in pipeline.config.items() if key in arguments and key not in base}
        mask_pipeline = cls(**base, mask_controlnet=mask_controlnet, **components, **config)
        mask_pipeline.set_progress_bar_config(**getattr(pipeline, "_progress_bar_config", {}))
        return mask_pipeline

    @classmethod
    def from_model_dir(cls, folder: str | Path) -> RadsynthMaskToImagePipeline:
        """A trained model folder: the text-to-image pipeline and its ``mask_controlnet`` beside it."""
        folder = Path(folder)
        if not (folder / CONTROLNET_FOLDER / "config.json").is_file():
            raise FileNotFoundError(f"{folder} has no {CONTROLNET_FOLDER}: train with conditioning.use_masks: true")
        # Loaded plainly: low_cpu_mem_usage patches torch.nn.Module process-wide (see sampling.generate).
        base = RadsynthTextToImagePipeline.from_pretrained(folder, use_safetensors=True, low_cpu_mem_usage=False)
        controlnet = RadsynthControlNet.from_pretrained(folder / CONTROLNET_FOLDER, use_safetensors=True,
                                                        low_cpu_mem_usage=False)
        return cls.from_text_to_image(base, controlnet)

    @torch.no_grad()
    def __call__(self, prompts: str | list[str], label_maps: torch.Tensor | np.ndarray, conditioning_scale: float = 1.0,
                 **kwargs) -> RadsynthPipelineOutput | tuple:
        """One image per prompt, each on its label map's grid.

        label_maps: integer labels (B, 1, *image_shape) in 0..num_labels-1, one per prompt.
        conditioning_scale: 0 gives the text-to-image model's image; 1 is what the ControlNet trained at.
        Other arguments as ``RadsynthTextToImagePipeline.__call__``.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        label_maps = torch.as_tensor(np.asarray(label_maps) if not torch.is_tensor(label_maps) else label_maps)
        expected = (len(prompts), 1, *self.config.image_shape)
        if tuple(label_maps.shape) != expected:
            raise ValueError(f"label_maps must have shape {expected} (one per prompt, on the image grid), "
                             f"got {tuple(label_maps.shape)}")
        controls = one_hot_labels(label_maps, self.mask_controlnet.config.num_labels).to(
            device=self._execution_device, dtype=self.mask_controlnet.dtype)

        def residuals(model_input, timestep, context, class_labels, spacing):
            both_halves = controls if len(model_input) == len(controls) else torch.cat([controls, controls])
            down, mid = self.mask_controlnet(model_input, timestep, self.unet.conditioning_context(context, spacing),
                                             both_halves, conditioning_scale, class_labels)
            return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

        return super().__call__(prompts, residuals=residuals, **kwargs)

"""Training a ControlNet on label maps beside the frozen base model (UNet and text encoder unchanged).

The loss is the base model's denoising loss with the ControlNet's residuals added inside the UNet, so the
ControlNet learns only what the label map adds. Text and classes are still dropped at ``condition_dropout``
while the label map always stays: sampling then keeps classifier-free guidance over text with the mask on.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .controlnet import RadsynthControlNet
from .diffusion_trainer import DiffusionTrainer
from .unet import RadsynthUNet


class ControlNetTrainer(DiffusionTrainer):
    """``DiffusionTrainer`` whose only trained module is the ControlNet; batches carry ``label_maps``."""

    def __init__(self, controlnet: RadsynthControlNet, unet: RadsynthUNet, text_encoder: torch.nn.Module, *args,
                 conditioning_scale: float = 1.0, **kwargs):
        for frozen in (unet, text_encoder):
            frozen.requires_grad_(False)
        self.controlnet, self.conditioning_scale = controlnet, conditioning_scale
        super().__init__(unet, text_encoder, *args, **kwargs)
        self.controlnet = self.loop.accelerator.prepare(controlnet)

    def trained_modules(self, unet: RadsynthUNet, text_encoder: torch.nn.Module) -> list[torch.nn.Module]:
        return [self.controlnet]

    def accumulated_modules(self) -> tuple[torch.nn.Module, ...]:
        return (self.controlnet,)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                class_labels: torch.Tensor | None, batch: dict) -> torch.Tensor:
        if "label_maps" not in batch:
            raise ValueError("ControlNet training needs label maps: set CachedLatents.label_maps")
        device = self.loop.accelerator.device
        unet, spacing = self.loop.accelerator.unwrap_model(self.unet), batch["spacing"].to(device)
        down, mid = self.controlnet(noisy, timesteps, unet.conditioning_context(context, spacing),
                                    batch["label_maps"].to(device), self.conditioning_scale, class_labels)
        return self.unet(noisy, timesteps, context, class_labels=class_labels, spacing=spacing,
                         down_block_additional_residuals=down, mid_block_additional_residual=mid)

    @contextmanager
    def inference_controlnet(self):
        """The ControlNet in eval mode with its EMA weights swapped in; its training state restored after."""
        with self.inference_weights():
            controlnet = self.loop.accelerator.unwrap_model(self.controlnet)
            controlnet.eval()
            try:
                yield controlnet
            finally:
                controlnet.train()

"""The unpaired translation baseline: a CycleGAN (Zhu et al., ICCV 2017) on MONAI networks, 2D or 3D.

Two generators map images of one modality to the other and back; a patch discriminator per modality tells real
images from translated ones (least-squares GAN), and the cycle loss (a -> b -> a returns a) ties each translation
to its source, which is all that keeps the anatomy when nothing is paired. Each generator is a residual MONAI
``UNet`` with a tanh head (UVCGAN's U-Net generator, without its transformer bottleneck), images in [-1, 1] as in
the preprocessed cache. This is the comparison the translation issue asks for beside the diffusion bridge
(``pipelines.sampling.translation``), not radsynth's recommended method: it knows nothing of labels or prompts.

No identity loss by default: it asks G(b) = b for an image already in b's modality, which keeps photographs'
colours but across CT and MRI would teach the generators to leave intensities as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import PatchDiscriminator, UNet
from torch import Tensor, nn

from .data import batch_indices
from .trainer import LoopSettings, TrainingLoop

__all__ = ["CycleGANTrainer", "ImageSet", "RadsynthCycleGAN"]


class ImageSet(Protocol):
    """Images a trainer draws batches from by index (``generators.data.CachedImages``)."""

    def __len__(self) -> int: ...

    def images(self, indices: Sequence[int]) -> Tensor: ...


def _generator(spatial_dims: int, channels: Sequence[int], num_res_units: int) -> nn.Module:
    unet = UNet(spatial_dims=spatial_dims, in_channels=1, out_channels=1, channels=tuple(channels),
                strides=(2,) * (len(channels) - 1), num_res_units=num_res_units, norm="instance")
    return nn.Sequential(unet, nn.Tanh())


class RadsynthCycleGAN(ModelMixin, ConfigMixin):
    """The two generators of a CycleGAN between ``modalities`` (a, b); saved and loaded as safetensors + JSON."""

    @register_to_config
    def __init__(self, spatial_dims: int = 2, modalities: tuple[str, str] | list[str] = ("ct", "mri"),
                 channels: tuple[int, ...] | list[int] = (32, 64, 128, 256), num_res_units: int = 2):
        super().__init__()
        if len(modalities) != 2 or modalities[0] == modalities[1]:
            raise ValueError(f"a CycleGAN joins two different modalities, got {list(modalities)}")
        self.generators = nn.ModuleDict({self.direction(*pair): _generator(spatial_dims, channels, num_res_units)
                                         for pair in (modalities, modalities[::-1])})

    @staticmethod
    def direction(source: str, target: str) -> str:
        return f"{source}_to_{target}"

    def forward(self, images: Tensor, source: str, target: str) -> Tensor:
        """``images`` of modality ``source`` (B, 1, *shape) in [-1, 1] as modality ``target``."""
        name = self.direction(source, target)
        if name not in self.generators:
            raise ValueError(f"this CycleGAN translates between {list(self.config.modalities)}, not {source} -> {target}")
        return self.generators[name](images)


class CycleGANTrainer:
    """Least-squares adversarial + cycle (+ identity) losses on unpaired batches of the two modalities.

    images: one ``ImageSet`` per modality, in the model's order; each step draws a batch of each from ``step``
    alone (``batch_indices``), so a resumed run continues exactly. Adam at (0.5, 0.999) as in the paper.
    """

    def __init__(self, model: RadsynthCycleGAN, images: tuple[ImageSet, ImageSet], run_dir: str | Path,
                 settings: LoopSettings, learning_rate: float = 2e-4, batch_size: int = 4, seed: int = 0,
                 cycle_weight: float = 10.0, identity_weight: float = 0.0, discriminator_layers: int = 3):
        self.loop = TrainingLoop(run_dir, settings)
        self.images, self.batch_size, self.seed = images, batch_size, seed
        self.cycle_weight, self.identity_weight = cycle_weight, identity_weight
        self.modalities = tuple(model.config.modalities)
        spatial_dims = model.config.spatial_dims
        discriminators = nn.ModuleDict({
            modality: PatchDiscriminator(spatial_dims=spatial_dims, num_layers_d=discriminator_layers, channels=32,
                                         in_channels=1, out_channels=1)
            for modality in self.modalities})
        betas = (0.5, 0.999)
        accelerator = self.loop.accelerator
        self.model, self.optimizer, self.discriminators, self.discriminator_optimizer = accelerator.prepare(
            model, torch.optim.Adam(model.parameters(), lr=learning_rate, betas=betas),
            discriminators, torch.optim.Adam(discriminators.parameters(), lr=learning_rate, betas=betas))
        self.adversarial = PatchAdversarialLoss(criterion="least_squares")

    def fit(self) -> RadsynthCycleGAN:
        self.loop.run(self.train_step)
        return self.loop.accelerator.unwrap_model(self.model)

    def batches(self, step: int) -> dict[str, Tensor]:
        accelerator = self.loop.accelerator
        return {modality: images.images(batch_indices(len(images), self.batch_size, step, self.seed + offset,
                                                      accelerator.process_index, accelerator.num_processes))
                .to(accelerator.device)
                for offset, (modality, images) in enumerate(zip(self.modalities, self.images))}

    def train_step(self, step: int) -> dict[str, float]:
        real = self.batches(step)
        a, b = self.modalities
        fake = {b: self.model(real[a], a, b), a: self.model(real[b], b, a)}
        cycled = {a: self.model(fake[b], b, a), b: self.model(fake[a], a, b)}
        adversarial = sum(self._adversarial(modality, fake[modality], True) for modality in (a, b))
        cycle = sum(F.l1_loss(cycled[m], real[m]) for m in (a, b))
        total = adversarial + self.cycle_weight * cycle
        identity = torch.zeros(())
        if self.identity_weight:
            identity = F.l1_loss(self.model(real[b], a, b), real[b]) + F.l1_loss(self.model(real[a], b, a), real[a])
            total = total + self.identity_weight * identity
        accelerator = self.loop.accelerator
        self.optimizer.zero_grad()
        accelerator.backward(total)
        self.optimizer.step()
        # The generator pass left gradients in the discriminators: they are not their objective.
        self.discriminator_optimizer.zero_grad()
        discriminator = sum(0.5 * (self._adversarial(m, real[m], True, True) +
                                   self._adversarial(m, fake[m].detach(), False, True)) for m in (a, b))
        accelerator.backward(discriminator)
        self.discriminator_optimizer.step()
        return {"loss": total.item(), "adversarial": adversarial.item(), "cycle": cycle.item(),
                "identity": float(identity), "discriminator": discriminator.item()}

    def _adversarial(self, modality: str, images: Tensor, target_is_real: bool,
                     for_discriminator: bool = False) -> Tensor:
        logits = self.discriminators[modality](images.contiguous())[-1]
        return self.adversarial(logits, target_is_real=target_is_real, for_discriminator=for_discriminator)

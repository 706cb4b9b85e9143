"""Training the autoencoder: L1 + KL (+ patch-adversarial) on preprocessed images, then its latent scale."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from .autoencoder import RadsynthAutoencoder, estimate_scaling_factor
from .data import CachedImages, batch_indices
from .losses import AutoencoderLoss, reconstruction_metrics
from .trainer import LoopSettings, TrainingLoop


class AutoencoderTrainer:
    def __init__(self, autoencoder: RadsynthAutoencoder, loss: AutoencoderLoss, images: CachedImages,
                 run_dir: str | Path, settings: LoopSettings, learning_rate: float, batch_size: int, seed: int,
                 max_grad_norm: float = 1.0):
        self.loop = TrainingLoop(run_dir, settings)
        self.images, self.batch_size, self.seed, self.max_grad_norm = images, batch_size, seed, max_grad_norm
        accelerator = self.loop.accelerator
        optimizer = torch.optim.Adam(autoencoder.parameters(), lr=learning_rate)
        self.autoencoder, self.optimizer = accelerator.prepare(autoencoder, optimizer)
        self.loss = loss.to(accelerator.device)
        self.discriminator_optimizer = None
        if loss.discriminator is not None:
            self.loss.discriminator, self.discriminator_optimizer = accelerator.prepare(
                loss.discriminator, torch.optim.Adam(loss.discriminator.parameters(), lr=learning_rate))

    def fit(self) -> RadsynthAutoencoder:
        self.loop.run(self.train_step)
        return self.loop.accelerator.unwrap_model(self.autoencoder)

    def train_step(self, step: int) -> dict[str, float]:
        accelerator = self.loop.accelerator
        accumulation = self.loop.settings.gradient_accumulation_steps
        logs: dict[str, float] = {}
        for micro in range(accumulation):
            indices = batch_indices(len(self.images), self.batch_size, step * accumulation + micro, self.seed,
                                    accelerator.process_index, accelerator.num_processes)
            x = self.images.images(indices).to(accelerator.device)
            with accelerator.accumulate(self.autoencoder):
                reconstruction, z_mu, z_sigma = self.autoencoder(x)
                total, parts = self.loss.generator_loss(x, reconstruction, z_mu, z_sigma)
                accelerator.backward(total)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(self.autoencoder.parameters(), self.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad()
            if self.discriminator_optimizer is not None:
                with accelerator.accumulate(self.loss.discriminator):
                    # The generator pass left gradients in the discriminator: they are not its objective.
                    self.discriminator_optimizer.zero_grad()
                    accelerator.backward(self.loss.discriminator_loss(x, reconstruction))
                    self.discriminator_optimizer.step()
                    self.discriminator_optimizer.zero_grad()
            logs = {"loss": total.item(), **{name: value.item() for name, value in parts.items()}}
        return logs


def image_batches(images: CachedImages, batch_size: int, device: torch.device | str) -> Iterator[torch.Tensor]:
    for start in range(0, len(images), batch_size):
        yield images.images(range(start, min(start + batch_size, len(images)))).to(device)


@torch.no_grad()
def calibrate_scaling_factor(autoencoder: RadsynthAutoencoder, images: CachedImages, batch_size: int) -> float:
    """Set (and return) the factor that gives the training latents unit standard deviation."""
    autoencoder.eval()
    factor = estimate_scaling_factor(autoencoder, image_batches(images, batch_size, autoencoder.device))
    autoencoder.set_scaling_factor(factor)
    return factor


@torch.no_grad()
def holdout_reconstruction(autoencoder: RadsynthAutoencoder, images: CachedImages, batch_size: int,
                           intensity_low: float, intensity_high: float) -> dict[str, float]:
    """PSNR, SSIM and MAE in physical units (HU for CT) on cases the autoencoder never saw, case-weighted."""
    autoencoder.eval()
    totals: dict[str, float] = {}
    for x in image_batches(images, batch_size, autoencoder.device):
        reconstruction = autoencoder.decode(autoencoder.encode(x)).clamp(-1, 1)
        for name, value in reconstruction_metrics(x, reconstruction, intensity_low, intensity_high).items():
            totals[name] = totals.get(name, 0.0) + float(value) * len(x)
    return {name: total / len(images) for name, total in totals.items()}

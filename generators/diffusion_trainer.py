"""Training the latent diffusion backbone (and the jointly trained text encoder) on cached latents."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from .data import CachedLatents, batch_indices, step_generator
from .objectives import TrainingObjective
from .trainer import LoopSettings, TrainingLoop
from .unet import RadsynthUNet

NULL_PROMPT = ""


class DiffusionTrainer:
    """One optimizer step per ``train_step``: latents ~ posterior, prompts dropped for guidance, noise, MSE.

    The text encoder is trained with the UNet when it has trainable parameters (the default small
    transformer) and left alone when frozen (a pretrained encoder). EMA covers everything that trains.
    """

    def __init__(self, unet: RadsynthUNet, text_encoder: torch.nn.Module, latents: CachedLatents,
                 objective: TrainingObjective, run_dir: str | Path, settings: LoopSettings, *, learning_rate: float,
                 lr_schedule: str, warmup_steps: int, batch_size: int, condition_dropout: float,
                 max_grad_norm: float, ema_decay: float | None, seed: int):
        self.loop = TrainingLoop(run_dir, settings)
        accelerator = self.loop.accelerator
        self.latents, self.objective, self.batch_size = latents, objective, batch_size
        self.condition_dropout, self.max_grad_norm, self.seed = condition_dropout, max_grad_norm, seed
        self.text_trains = any(p.requires_grad for p in text_encoder.parameters())
        parameters = [p for module in self.trained_modules(unet, text_encoder) for p in module.parameters()
                      if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=1e-2)
        schedule = get_scheduler("cosine" if lr_schedule == "cosine" else "constant_with_warmup", optimizer,
                                 num_warmup_steps=warmup_steps, num_training_steps=settings.max_steps)
        self.unet, self.text_encoder, self.optimizer, self.schedule = accelerator.prepare(
            unet, text_encoder, optimizer, schedule)
        self.parameters = parameters
        self.ema = None
        if ema_decay is not None:
            self.ema = EMAModel(parameters, decay=ema_decay)
            self.ema.to(accelerator.device)
            accelerator.register_for_checkpointing(self.ema)

    def trained_modules(self, unet: RadsynthUNet, text_encoder: torch.nn.Module) -> list[torch.nn.Module]:
        return [unet, text_encoder] if self.text_trains else [unet]

    def fit(self, validate: Callable[[int], dict[str, float] | None] | None = None) -> int:
        return self.loop.run(self.train_step, validate)

    def train_step(self, step: int) -> dict[str, float]:
        accelerator = self.loop.accelerator
        accumulation = self.loop.settings.gradient_accumulation_steps
        for micro in range(accumulation):
            index = step * accumulation + micro
            generator = step_generator(self.seed, index, accelerator.process_index)
            rows = batch_indices(len(self.latents), self.batch_size, index, self.seed,
                                 accelerator.process_index, accelerator.num_processes)
            batch = self.latents.batch(rows, generator)
            with accelerator.accumulate(*self.accumulated_modules()):
                loss = self._loss(batch, generator)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(self.parameters, self.max_grad_norm)
                self.optimizer.step()
                self.schedule.step()
                self.optimizer.zero_grad()
        if self.ema is not None:
            self.ema.step(self.parameters)
        return {"loss": loss.item(), "lr": self.schedule.get_last_lr()[0]}

    def accumulated_modules(self) -> tuple[torch.nn.Module, ...]:
        """The (prepared) modules whose gradients accumulate across micro-batches."""
        return self.unet, self.text_encoder

    def _loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        device = self.loop.accelerator.device
        clean = batch["latents"].to(device)
        keep = torch.rand(len(batch["prompts"]), generator=generator) >= self.condition_dropout
        prompts = [prompt if kept else NULL_PROMPT for prompt, kept in zip(batch["prompts"], keep.tolist())]
        context = self.text_encoder.encode(prompts)
        noise = torch.randn(clean.shape, generator=generator, dtype=clean.dtype).to(device)
        timesteps = self.objective.sample_timesteps(len(clean), device=device, generator=generator)
        noisy, target, model_timesteps = self.objective.noisy_and_target(clean, noise, timesteps)
        class_labels = batch.get("class_labels")
        if class_labels is not None:  # dropped conditions lose their class too: index 0 is the null class
            class_labels = (class_labels * keep).to(device)
        prediction = self.predict(noisy, model_timesteps, context, class_labels, batch)
        return F.mse_loss(prediction.float(), target.float())

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                class_labels: torch.Tensor | None, batch: dict) -> torch.Tensor:
        return self.unet(noisy, timesteps, context, class_labels=class_labels,
                         spacing=batch["spacing"].to(self.loop.accelerator.device))

    def modules(self) -> tuple[RadsynthUNet, torch.nn.Module]:
        accelerator = self.loop.accelerator
        return accelerator.unwrap_model(self.unet), accelerator.unwrap_model(self.text_encoder)

    @contextmanager
    def inference_weights(self) -> Iterator[tuple[RadsynthUNet, torch.nn.Module]]:
        """The modules in eval mode with EMA weights swapped in (validation, export); training state restored after."""
        unet, text_encoder = self.modules()
        unet.eval()
        text_encoder.eval()
        if self.ema is not None:
            self.ema.store(self.parameters)
            self.ema.copy_to(self.parameters)
        try:
            yield unet, text_encoder
        finally:
            if self.ema is not None:
                self.ema.restore(self.parameters)
            unet.train()
            text_encoder.train()

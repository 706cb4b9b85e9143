"""Training a latent diffusion model's trained parts on cached latents: one trainer for every part.

The base model (UNet and the jointly trained text encoder), a ControlNet beside the frozen base, the mask
generator under the base's frozen text encoder and a LoRA fine-tune all minimise the same loss, the
``LatentDiffusion``'s: they differ only in which modules train (``trained``) and what the core holds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from .augmentation import LatentAugment
from .data import CachedLatents, batch_indices, step_generator, training_prompts
from .latent_diffusion import LatentDiffusion
from .trainer import LoopSettings, TrainingLoop

CORE_MODULES = ("denoiser", "text_encoder", "controlnet")


class DiffusionTrainer:
    """One optimizer step per ``train_step``: latents ~ posterior, conditions dropped for guidance, noise, MSE.

    diffusion: the model being trained; trained: the modules among its ``denoiser``, ``text_encoder`` and
    ``controlnet`` whose parameters with ``requires_grad`` train (the rest stay as they are). EMA covers what
    trains. Batches carrying ``label_maps`` condition the ControlNet (or a UNet that reads maps); text and classes
    are dropped at ``condition_dropout`` while the label map stays, so guidance over text keeps working with a
    mask; ``map_dropout`` drops the map itself, so a UNet that reads maps also learns to draw without one.
    Batches carrying ``attribute_prompts`` show a case's attributes alone instead of its whole prompt at
    ``text_dropout``: sampling asks in attributes alone, so the model must learn them without a report beside.
    With ``augment`` each case's latents are transformed and the denoiser told how (its augmentation label);
    a batch with label maps is never augmented (the map would have to move with it).
    """

    def __init__(self, diffusion: LatentDiffusion, trained: Sequence[torch.nn.Module], latents: CachedLatents,
                 run_dir: str | Path, settings: LoopSettings, *, learning_rate: float, lr_schedule: str,
                 warmup_steps: int, batch_size: int, condition_dropout: float, max_grad_norm: float,
                 ema_decay: float | None, seed: int, text_dropout: float = 0.0, map_dropout: float = 0.0,
                 augment: LatentAugment | None = None):
        self.loop = TrainingLoop(run_dir, settings)
        accelerator = self.loop.accelerator
        self.diffusion, self.latents, self.batch_size = diffusion, latents, batch_size
        self.condition_dropout, self.max_grad_norm, self.seed = condition_dropout, max_grad_norm, seed
        self.text_dropout, self.map_dropout = text_dropout, map_dropout
        if augment is not None and latents.label_maps is not None:
            raise ValueError("latents with label maps cannot be augmented: the maps would not move with them")
        self.augment = augment
        self.parameters = [p for module in trained for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.parameters, lr=learning_rate, weight_decay=1e-2)
        schedule = get_scheduler("cosine" if lr_schedule == "cosine" else "constant_with_warmup", optimizer,
                                 num_warmup_steps=warmup_steps, num_training_steps=settings.max_steps)
        *prepared, self.optimizer, self.schedule = accelerator.prepare(*trained, optimizer, schedule)
        self.trained = list(prepared)
        self._swap_in(dict(zip(map(id, trained), prepared)))
        self.ema = None
        if ema_decay is not None:
            self.ema = EMAModel(self.parameters, decay=ema_decay)
            self.ema.to(accelerator.device)
            self.loop.register_state("ema", self.ema)

    def _swap_in(self, prepared: dict[int, torch.nn.Module]) -> None:
        """The core calls the prepared (possibly wrapped) trained modules; the others are frozen on the device."""
        for name in CORE_MODULES:
            module = getattr(self.diffusion, name)
            if module is not None and id(module) not in prepared:
                module.requires_grad_(False).to(self.loop.accelerator.device)
            if module is not None:
                setattr(self.diffusion, name, prepared.get(id(module), module))

    def fit(self, validate: Callable[[int], dict[str, float] | None] | None = None) -> int:
        return self.loop.run(self.train_step, validate)

    def train_step(self, step: int) -> dict[str, float]:
        accelerator = self.loop.accelerator
        accumulation = self.loop.settings.gradient_accumulation_steps
        for micro in range(accumulation):
            index = step * accumulation + micro
            generator = step_generator(self.seed, index, accelerator.process_index)
            rows = batch_indices(len(self.latents), self.batch_size, index, self.seed,
                                 accelerator.process_index, accelerator.num_processes, self.latents.row_weights)
            batch = self.latents.batch(rows, generator)
            with accelerator.accumulate(*self.trained):
                loss = self.loss(batch, generator)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(self.parameters, self.max_grad_norm)
                self.apply_gradients()
        if self.ema is not None:
            self.ema.step(self.parameters)
        return {"loss": loss.item(), "lr": self.schedule.get_last_lr()[0]}

    def apply_gradients(self) -> None:
        """One optimiser and learning-rate step on the gradients now in ``.grad``, which it then clears."""
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)

    def loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """The batch's mean denoising loss, its conditions dropped at ``condition_dropout``, its prompts' text at
        ``text_dropout`` and its label maps at ``map_dropout``, its latents augmented when the trainer augments."""
        device = self.loop.accelerator.device
        clean, augment = batch["latents"], None
        if self.augment is not None:  # draws nothing otherwise: runs without augmentation keep their streams
            clean, augment = self.augment(clean, generator)
        clean = clean.to(device)
        keep = torch.rand(len(clean), generator=generator) >= self.condition_dropout
        prompts = training_prompts(batch, self.text_dropout, generator)
        label_maps, keep_map = batch.get("label_maps"), None
        if label_maps is not None and self.map_dropout:  # draws nothing otherwise, as augmentation
            keep_map = torch.rand(len(clean), generator=generator) >= self.map_dropout
        condition = self.diffusion.condition(prompts, class_labels=batch.get("class_labels"),
                                             spacing=batch["spacing"], label_maps=label_maps, keep=keep,
                                             keep_map=keep_map, augment=augment)
        noise = torch.randn(clean.shape, generator=generator, dtype=clean.dtype).to(device)
        timesteps = self.diffusion.objective.sample_timesteps(len(clean), device=device, generator=generator)
        return self.diffusion.losses(clean, condition, noise, timesteps).mean()

    def unwrapped(self) -> list[torch.nn.Module]:
        return [self.loop.accelerator.unwrap_model(module) for module in self.trained]

    @contextmanager
    def inference_weights(self) -> Iterator[list[torch.nn.Module]]:
        """The trained modules in eval mode with EMA weights swapped in (validation, export); training state restored
        after. The modules come in the order ``trained`` gave them."""
        modules = self.unwrapped()
        for module in modules:
            module.eval()
        if self.ema is not None:
            self.ema.store(self.parameters)
            self.ema.copy_to(self.parameters)
        try:
            yield modules
        finally:
            if self.ema is not None:
                self.ema.restore(self.parameters)
            for module in modules:
                module.train()

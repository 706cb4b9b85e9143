"""Consistency distillation: a few-step student from a trained, guided latent diffusion model (LCM-style).

Each step takes training latents x0, noises them to a timestep t of the teacher solver's grid, and lets the
teacher (the saved model, with classifier-free guidance) take one solver step down to the grid's next timestep s
(DDIM, or Euler for rectified flow: x_s = signal(s) x0_hat + noise_level(s) eps_hat). The student is trained so
that its consistency function at (x_t, t) matches a slowly moving copy of itself (the target, an EMA) at
(x_s, s); at s = 0 the target is x_s itself. A student consistent along the teacher's guided trajectories maps
any noisy latent to its trajectory's end, so a few jumps (``ConsistencyScheduler``) replace the whole solver,
and the guidance is learnt: the student runs once per step instead of twice (Luo et al. 2023, "Latent
Consistency Models"; Song et al. 2023, "Consistency Models").

The student starts as a copy of the teacher's UNet and has its architecture, so a ControlNet trained beside the
teacher plugs into it unchanged.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler

from .consistency import ConsistencyScheduler
from .data import CachedLatents, batch_indices, step_generator, training_prompts
from .latent_diffusion import LatentDiffusion
from .trainer import LoopSettings, TrainingLoop

__all__ = ["ConsistencyDistiller"]


class ConsistencyDistiller:
    """Trains ``student`` (a copy of the teacher's denoiser) to be consistent along the guided teacher's solver.

    teacher: the trained model (its denoiser is frozen); scheduler: the student's sampler, whose teacher grid
    and boundary functions the loss uses; guidance_scale: the teacher guidance the student learns.
    target_decay: EMA rate of the target network (LCM's 0.95); the target is what is saved.
    text_dropout: the share of prompts shown as their attributes alone (``training_prompts``), as the teacher learnt.
    """

    def __init__(self, teacher: LatentDiffusion, student: torch.nn.Module, latents: CachedLatents,
                 scheduler: ConsistencyScheduler, run_dir: str | Path, settings: LoopSettings, *,
                 guidance_scale: float, learning_rate: float, batch_size: int, target_decay: float,
                 max_grad_norm: float, warmup_steps: int, seed: int, text_dropout: float = 0.0):
        self.loop = TrainingLoop(run_dir, settings)
        accelerator = self.loop.accelerator
        self.teacher, self.latents, self.scheduler = teacher, latents, scheduler
        self.guidance_scale, self.batch_size, self.target_decay = guidance_scale, batch_size, target_decay
        self.max_grad_norm, self.seed, self.text_dropout = max_grad_norm, seed, text_dropout
        for module in (teacher.denoiser, teacher.text_encoder):
            module.requires_grad_(False).eval().to(accelerator.device)
        self.target = copy.deepcopy(student).requires_grad_(False).to(accelerator.device)
        student.requires_grad_(True).train()
        optimizer = torch.optim.AdamW(student.parameters(), lr=learning_rate, weight_decay=1e-2)
        schedule = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=warmup_steps)
        self.student, self.optimizer, self.schedule = accelerator.prepare(student, optimizer, schedule)
        self.loop.register_state("target", self.target)
        # The solver grid, ending at 0 (clean): step n goes from grid[n] to grid[n + 1].
        grid = scheduler.teacher_grid(accelerator.device)
        self.grid = torch.cat([grid, grid.new_zeros(1)])

    def _model(self, denoiser: torch.nn.Module) -> LatentDiffusion:
        """The student or target with the teacher's text encoder and vocabulary, unguided and unclipped."""
        teacher = self.teacher
        return LatentDiffusion(denoiser, teacher.codec, teacher.text_encoder, teacher.objective,
                               class_attribute=teacher.class_attribute, class_names=teacher.class_names,
                               spacing=teacher.spacing)

    def fit(self) -> int:
        return self.loop.run(self.train_step)

    def train_step(self, step: int) -> dict[str, float]:
        accelerator, objective = self.loop.accelerator, self.teacher.objective
        generator = step_generator(self.seed, step, accelerator.process_index)
        rows = batch_indices(len(self.latents), self.batch_size, step, self.seed, accelerator.process_index,
                             accelerator.num_processes)
        batch = self.latents.batch(rows, generator)
        clean = batch["latents"].to(accelerator.device)
        condition = self.teacher.condition(training_prompts(batch, self.text_dropout, generator),
                                           class_labels=batch.get("class_labels"),
                                           spacing=batch["spacing"])
        index = torch.randint(0, len(self.grid) - 1, (len(clean),), generator=generator).to(accelerator.device)
        t, s = self.grid[index], self.grid[index + 1]
        noise = torch.randn(clean.shape, generator=generator, dtype=clean.dtype).to(accelerator.device)
        noisy = objective.noised(clean, noise, t)
        with torch.no_grad():
            guided = self.teacher.guided_prediction(noisy, t, condition, self.guidance_scale,
                                                    self.teacher.unconditional(condition))
            clean_hat, noise_hat = objective.clean_and_noise(noisy, guided, t)
            at_s = torch.where(_per_sample(s == 0, clean), clean_hat, objective.noised(clean_hat, noise_hat, s))
            target = self.scheduler.consistency_function(at_s, self._model(self.target).predict(at_s, s, condition), s)
        prediction = self.scheduler.consistency_function(noisy, self._model(self.student).predict(noisy, t, condition), t)
        loss = F.mse_loss(prediction.float(), target.float())
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(self.student.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad()
        self._update_target()
        return {"loss": loss.item(), "lr": self.schedule.get_last_lr()[0]}

    @torch.no_grad()
    def _update_target(self) -> None:
        online = list(self.loop.accelerator.unwrap_model(self.student).parameters())
        torch._foreach_lerp_(list(self.target.parameters()), online, 1.0 - self.target_decay)

    @contextmanager
    def inference_weights(self) -> Iterator[torch.nn.Module]:
        """The student to save: the target network (the EMA of the online student), in eval mode."""
        self.target.eval()
        yield self.target


def _per_sample(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.reshape(-1, *([1] * (like.ndim - 1)))

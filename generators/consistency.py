"""Multistep consistency sampling: the scheduler of a distilled few-step student, for any radsynth objective.

A consistency model maps a noisy latent at any timestep straight to the clean latent,
f(x, t) = c_skip(t) x + c_out(t) x0(x, t), with c_skip(0) = 1 and c_out(0) = 0 so that f(x, 0) = x (Song et al.
2023). Sampling takes a few such jumps: predict the clean latent, noise it down to the next (lower) timestep,
predict again (Luo et al. 2023, "Latent Consistency Models"). The boundary functions are LCM's (timestep
scaling 10, sigma_data 0.5).

diffusers' ``LCMScheduler`` does this for the discrete (alphas_cumprod) schedules only; this one is written on
``TrainingObjective``'s noise path, so it serves epsilon, v-prediction and rectified-flow students alike.
The student's timesteps are a subset of the teacher solver's grid (``teacher_grid``), the grid it was
distilled on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .objectives import TrainingObjective, build_inference_scheduler

__all__ = ["ConsistencyScheduler", "ConsistencySchedulerOutput"]


@dataclass
class ConsistencySchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor
    denoised: torch.Tensor


class ConsistencyScheduler(SchedulerMixin, ConfigMixin):
    """Few-step sampler of a consistency-distilled denoiser whose outputs follow ``objective``.

    teacher_steps: the teacher solver's grid (DDIM, or FlowMatchEuler for rectified flow, at this many steps),
    on which the student was distilled and from which its sampling timesteps are taken.
    noise_schedule: the teacher's betas (None: radsynth's, ``objectives.NOISE_SCHEDULE``).
    """

    order = 1
    init_noise_sigma = 1.0

    @register_to_config
    def __init__(self, objective: str = "v_prediction", num_train_timesteps: int = 1000, teacher_steps: int = 50,
                 timestep_scaling: float = 10.0, sigma_data: float = 0.5, noise_schedule: dict | None = None):
        self.objective = TrainingObjective(objective, num_train_timesteps, noise_schedule=noise_schedule)
        self.timesteps = self.teacher_grid()
        self.num_inference_steps = None

    def teacher_grid(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The teacher solver's timesteps in model units, from the noisiest down."""
        solver = "flow_match_euler" if self.objective.is_flow else "ddim"
        scheduler = build_inference_scheduler(self.config.objective, solver, self.config.num_train_timesteps,
                                              self.config.noise_schedule)
        scheduler.set_timesteps(self.config.teacher_steps, device=device)
        return scheduler.timesteps

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """Evenly spaced steps down the teacher grid, starting at its noisiest (LCM's skipping schedule)."""
        grid = self.teacher_grid(device)
        if not 1 <= num_inference_steps <= len(grid):
            raise ValueError(f"num_inference_steps must lie in 1..{len(grid)} (the teacher grid), "
                             f"got {num_inference_steps}")
        stride = len(grid) // num_inference_steps
        self.timesteps = grid[::stride][:num_inference_steps]
        self.num_inference_steps = num_inference_steps

    def boundary(self, model_timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_skip, c_out) at the timesteps, shaped to broadcast on ``like``: (1, 0) at t = 0."""
        scaled = torch.as_tensor(model_timesteps, dtype=torch.float64).reshape(-1) * self.config.timestep_scaling
        sigma_data = self.config.sigma_data
        c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
        c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
        shape = (-1, *([1] * (like.ndim - 1)))
        return (c_skip.reshape(shape).to(like.device, like.dtype), c_out.reshape(shape).to(like.device, like.dtype))

    def consistency_function(self, sample: torch.Tensor, model_output: torch.Tensor,
                             model_timesteps: torch.Tensor) -> torch.Tensor:
        """f(x, t): the clean latents the student's output gives for ``sample``, exact at the boundary."""
        clean = self.objective.clean_and_noise(sample, model_output, model_timesteps)[0]
        c_skip, c_out = self.boundary(model_timesteps, sample)
        return c_skip * sample + c_out * clean

    def step(self, model_output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor, generator=None,
             return_dict: bool = True) -> ConsistencySchedulerOutput | tuple:
        """Jump to the clean latents, then (unless this was the last step) noise them to the next timestep."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        index = int((self.timesteps == torch.as_tensor(timestep).to(self.timesteps)).nonzero()[0])
        denoised = self.consistency_function(sample, model_output, timestep)
        if index + 1 < len(self.timesteps):
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            prev_sample = self.objective.noised(denoised, noise, self.timesteps[index + 1])
        else:
            prev_sample = denoised
        if not return_dict:
            return prev_sample, denoised
        return ConsistencySchedulerOutput(prev_sample=prev_sample, denoised=denoised)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

"""What the diffusion backbone learns to predict, and the inference schedulers that can sample it.

Three objectives share one interface (``noisy_and_target``):

- ``epsilon``: the UNet predicts the added noise (DDPM).
- ``v_prediction``: it predicts v = sqrt(a) * noise - sqrt(1 - a) * x0 (steadier at high noise levels, where
  epsilon-trained latent models drift; see DESIGN "Known pitfalls").
- ``rectified_flow``: x_t = (1 - t) x0 + t noise on a straight path and the UNet predicts the velocity
  noise - x0; the UNet's timestep is t * num_train_timesteps, the convention of diffusers'
  ``FlowMatchEulerDiscreteScheduler`` (sigma = t, timestep = sigma * 1000).

Training and sampling must agree on the noise schedule and the prediction type, so both come from here:
``TrainingObjective`` for the trainer and ``build_inference_scheduler`` for the pipelines. diffusers
schedulers accept latents of any rank, so the same code drives 2D (4D tensors) and 3D (5D tensors) models.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    SchedulerMixin,
)

from radsynth.configs.errors import UserInputError

OBJECTIVES = ("epsilon", "v_prediction", "rectified_flow")
DIFFUSION_SCHEDULERS = ("ddpm", "ddim", "dpm_solver")  # sample epsilon / v_prediction models
FLOW_SCHEDULERS = ("flow_match_euler",)  # sample rectified_flow models
FLOW_TIMESTEP_SAMPLING = ("uniform", "logit_normal")

# The latent-diffusion schedule of MONAI's LDM tutorials and MAISI: betas linear in sqrt between these ends.
# It keeps a little more signal at t = T than Stable Diffusion's (0.00085, 0.012) on small latents. A model
# fine-tuned from a pretrained base keeps the base's schedule instead (saved with the model, ``noise_schedule``).
NOISE_SCHEDULE = {"beta_schedule": "scaled_linear", "beta_start": 0.0015, "beta_end": 0.0195}
NOISE_SCHEDULE_KEYS = tuple(NOISE_SCHEDULE)


def _check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise UserInputError(
            "diffusion.objective", f"unknown objective '{objective}'", f"allowed: {', '.join(OBJECTIVES)}"
        )


def _is_flow(objective: str) -> bool:
    return objective == "rectified_flow"


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) so that one value per sample broadcasts over channels and any spatial rank."""
    return values.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


class TrainingObjective:
    """Draws training timesteps and turns (clean latents, noise, timesteps) into (model input, regression target).

    ``timesteps`` are integer indices in [0, num_train_timesteps) for epsilon / v_prediction and continuous
    t in (0, 1) for rectified flow; ``model_timesteps`` is what the UNet is given in both cases.
    """

    def __init__(self, name: str, num_train_timesteps: int = 1000, flow_timestep_sampling: str = "logit_normal",
                 noise_schedule: Mapping[str, object] | None = None, min_snr_gamma: float | None = None):
        _check_objective(name)
        if min_snr_gamma is not None and min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma}")
        if flow_timestep_sampling not in FLOW_TIMESTEP_SAMPLING:
            raise ValueError(
                f"flow_timestep_sampling must be one of {FLOW_TIMESTEP_SAMPLING}, got {flow_timestep_sampling!r}"
            )
        self.name = name
        self.num_train_timesteps = int(num_train_timesteps)
        self.flow_timestep_sampling = flow_timestep_sampling
        self.min_snr_gamma = min_snr_gamma
        # The forward (noising) process for the discrete objectives; rectified flow needs none.
        self.noise_scheduler = None if self.is_flow else DDPMScheduler(
            num_train_timesteps=self.num_train_timesteps, prediction_type=name, clip_sample=False,
            **(noise_schedule or NOISE_SCHEDULE))

    @property
    def is_flow(self) -> bool:
        return _is_flow(self.name)

    def __repr__(self) -> str:
        return f"TrainingObjective({self.name!r}, num_train_timesteps={self.num_train_timesteps})"

    def sample_timesteps(
        self, batch_size: int, device: torch.device | str | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        # Draw on the generator's own device (a CPU generator cannot fill a CUDA tensor), then move.
        draw_device = generator.device if generator is not None else device
        if not self.is_flow:
            timesteps = torch.randint(
                0, self.num_train_timesteps, (batch_size,), generator=generator, device=draw_device
            )
        elif self.flow_timestep_sampling == "uniform":
            timesteps = torch.rand(batch_size, generator=generator, device=draw_device)
        else:
            # Logit-normal t (Stable Diffusion 3): more training signal at mid noise levels, where the
            # velocity is hardest to predict; sigmoid keeps t strictly inside (0, 1).
            timesteps = torch.sigmoid(torch.randn(batch_size, generator=generator, device=draw_device))
        return timesteps.to(device) if device is not None else timesteps

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """Per-sample weights of the regression loss at training ``timesteps`` (B,), or None (unweighted).

        Min-SNR-gamma (Hang et al., ICCV 2023): the loss counted as an error in the clean latents weighted by
        min(SNR, gamma), so the nearly clean steps (SNR far above gamma, fine detail) no longer dominate the
        gradient over the noisy ones, where layout and the prompt's content are decided. Each objective's error
        is turned into a clean-latent error by how far the implied clean latents move per unit of output:
        noise_level / signal for epsilon, noise_level for v and for the flow velocity (clean = x_t - t v). This
        gives diffusers' min(SNR, gamma) / SNR for epsilon and min(SNR, gamma) / (SNR + 1) for v.
        """
        if self.min_snr_gamma is None:
            return None
        model_timesteps = self.model_timesteps(timesteps)
        signal, noise_level = self.levels(model_timesteps, torch.empty(len(model_timesteps), dtype=torch.float64))
        clean_per_output = noise_level / signal if self.name == "epsilon" else noise_level
        snr = (signal / noise_level) ** 2
        return (snr.clamp(max=self.min_snr_gamma) * clean_per_output**2).float()

    def model_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Training timesteps -> what the denoiser is given: t * num_train_timesteps for rectified flow (the unit of
        diffusers' FlowMatchEuler timesteps), the integer index otherwise (the unit of the other schedulers)."""
        if self.is_flow:
            return torch.as_tensor(timesteps) * self.num_train_timesteps
        return torch.as_tensor(timesteps).long()

    def path_timesteps(self, strength: float, num_steps: int) -> torch.Tensor:
        """Model timesteps from the clean end up to ``strength`` of the schedule (0 < strength <= 1) in
        ``num_steps`` equal steps: the rising path a deterministic inversion walks (``LatentDiffusion.travel``);
        reversed, the path back. Integer indices for the discrete schedules, t * num_train_timesteps for the flow."""
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if self.is_flow:
            return torch.linspace(0.0, strength, num_steps + 1) * self.num_train_timesteps
        top = strength * (self.num_train_timesteps - 1)
        return torch.unique(torch.linspace(0.0, top, num_steps + 1, dtype=torch.float64).round().long())

    def noisy_and_target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (noisy_latents, target, model_timesteps) for an MSE between the UNet output and target."""
        model_timesteps = self.model_timesteps(timesteps).to(latents.device)
        noisy = self.noised(latents, noise, model_timesteps)
        return noisy, self.output_for(noisy, latents, noise, model_timesteps), model_timesteps

    # ------------------------------------------------------------------------------- one noise path
    # x_t = signal(t) * x0 + noise_level(t) * noise: (sqrt(a_bar), sqrt(1 - a_bar)) for the discrete schedules,
    # (1 - t, t) for rectified flow. Every conversion between a denoiser's output, the clean latents and the noise
    # below is written once on these two numbers, in model timesteps (the unit a scheduler's timesteps are in):
    # training targets, the sampler's clean-latent clip, inpainting's noised background, distillation's solver.

    def levels(self, model_timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(signal, noise_level) at ``model_timesteps`` (a scalar or one per sample), shaped to broadcast on ``like``."""
        steps = torch.as_tensor(model_timesteps).reshape(-1).cpu()
        if self.is_flow:
            noise_level = _per_sample(steps.double() / self.num_train_timesteps, like)
            return 1 - noise_level, noise_level
        alpha_bar = _per_sample(self.noise_scheduler.alphas_cumprod[steps.long()], like)
        return alpha_bar**0.5, (1 - alpha_bar) ** 0.5

    def noised(self, clean: torch.Tensor, noise: torch.Tensor, model_timesteps: torch.Tensor) -> torch.Tensor:
        signal, noise_level = self.levels(model_timesteps, clean)
        return signal * clean + noise_level * noise

    def clean_and_noise(self, noisy: torch.Tensor, output: torch.Tensor,
                        model_timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The clean latents and the noise that a denoiser ``output`` implies for ``noisy``."""
        signal, noise_level = self.levels(model_timesteps, noisy)
        if self.name == "epsilon":
            return (noisy - noise_level * output) / signal, output
        if self.name == "v_prediction":
            clean = signal * noisy - noise_level * output
            return clean, noise_level * noisy + signal * output
        clean = noisy - noise_level * output  # velocity = noise - clean
        return clean, clean + output

    def output_for(self, noisy: torch.Tensor, clean: torch.Tensor, noise: torch.Tensor,
                   model_timesteps: torch.Tensor) -> torch.Tensor:
        """The output a perfect denoiser gives for ``noisy`` made of ``clean`` and ``noise``: the training target."""
        if self.name == "epsilon":
            return noise
        if self.name == "v_prediction":
            signal, noise_level = self.levels(model_timesteps, noisy)
            return signal * noise - noise_level * clean
        return noise - clean

    def clip_output(self, noisy: torch.Tensor, output: torch.Tensor, model_timesteps: torch.Tensor,
                    limit: float) -> torch.Tensor:
        """``output`` changed only as far as needed to keep its implied clean latents within [-limit, limit].

        The clip is made on the output rather than in the scheduler, so it works with every sampler (DPM-Solver
        and FlowMatchEuler cannot clip): output -> implied clean latents -> clip -> the output implying them.
        """
        clean = self.clean_and_noise(noisy, output, model_timesteps)[0]
        clipped = clean.clamp(-limit, limit)
        signal, noise_level = self.levels(model_timesteps, noisy)
        noise = (noisy - signal * clipped) / noise_level
        return self.output_for(noisy, clipped, noise, model_timesteps).to(output.dtype)


def build_inference_scheduler(objective: str, scheduler: str, num_train_timesteps: int = 1000,
                              noise_schedule: Mapping[str, object] | None = None) -> SchedulerMixin:
    """A diffusers scheduler that samples a model trained with ``objective`` (same schedule, same prediction type).
    noise_schedule: the model's betas (``NOISE_SCHEDULE_KEYS``); None: radsynth's own ``NOISE_SCHEDULE``."""
    _check_objective(objective)
    allowed = FLOW_SCHEDULERS if _is_flow(objective) else DIFFUSION_SCHEDULERS
    if scheduler not in DIFFUSION_SCHEDULERS + FLOW_SCHEDULERS:
        raise UserInputError(
            "sampling.scheduler",
            f"unknown scheduler '{scheduler}'",
            f"allowed with objective {objective}: {', '.join(allowed)}",
        )
    if scheduler not in allowed:
        raise UserInputError(
            "sampling.scheduler",
            f"'{scheduler}' cannot sample a model trained with objective '{objective}'",
            f"allowed with objective {objective}: {', '.join(allowed)}",
        )
    if scheduler == "flow_match_euler":
        # shift=1: sigma = t exactly as in training (resolution shifting is for much larger latents).
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=1.0)
    common = {"num_train_timesteps": num_train_timesteps, "prediction_type": objective,
              **(noise_schedule or NOISE_SCHEDULE)}
    if scheduler == "ddpm":
        # "trailing" starts sampling at t = T - 1, the noise level that pure Gaussian latents actually have.
        return DDPMScheduler(clip_sample=False, timestep_spacing="trailing", **common)
    if scheduler == "ddim":
        # clip_sample=False: the [-1, 1] clip is meant for pixels and washes latents out (see latent_clip);
        # set_alpha_to_one: the last step lands on the clean prediction instead of leaving t=0 noise behind.
        return DDIMScheduler(clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing", **common)
    return DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero", **common)

"""Training objectives and inference schedulers agree: what the UNet learns to predict is what the sampler reads."""

from __future__ import annotations

import pytest
import torch

from radsynth.configs.errors import UserInputError
from radsynth.generators.objectives import TrainingObjective, build_inference_scheduler

SHAPES = {"2d": (3, 4, 8, 8), "3d": (2, 4, 4, 4, 4)}  # latents (B, C, *spatial): 4D and 5D tensors
SAMPLERS = [
    ("epsilon", "ddim"),
    ("v_prediction", "ddim"),
    ("epsilon", "dpm_solver"),
    ("v_prediction", "ddpm"),
    ("rectified_flow", "flow_match_euler"),
]


def _latents_and_noise(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("name", ["epsilon", "v_prediction"])
def test_diffusion_target_matches_the_schedulers_closed_form(name, shape):
    latents, noise = _latents_and_noise(shape)
    objective = TrainingObjective(name)
    timesteps = torch.tensor([0, 500, 999][: shape[0]])
    noisy, target, model_timesteps = objective.noisy_and_target(latents, noise, timesteps)

    # x0 from (noisy, target, t) with the inference scheduler's own alphas: the two must share a schedule.
    alpha_bar = build_inference_scheduler(name, "ddim").alphas_cumprod[timesteps].reshape(-1, *[1] * (len(shape) - 1))
    if name == "epsilon":
        recovered = (noisy - (1 - alpha_bar).sqrt() * target) / alpha_bar.sqrt()
        torch.testing.assert_close(target, noise)
    else:
        recovered = alpha_bar.sqrt() * noisy - (1 - alpha_bar).sqrt() * target
    torch.testing.assert_close(recovered, latents, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model_timesteps, timesteps)
    assert (noisy[-1] - latents[-1]).abs().mean() > 0.5  # t = 999 is mostly noise


def test_rectified_flow_is_a_straight_path_with_velocity_target():
    latents, noise = _latents_and_noise(SHAPES["3d"])
    objective = TrainingObjective("rectified_flow", num_train_timesteps=1000)
    t = torch.tensor([0.25, 0.9])
    noisy, target, model_timesteps = objective.noisy_and_target(latents, noise, t)

    for row, value in enumerate(t.tolist()):
        torch.testing.assert_close(noisy[row], (1 - value) * latents[row] + value * noise[row])
    torch.testing.assert_close(target, noise - latents)
    torch.testing.assert_close(model_timesteps, torch.tensor([250.0, 900.0]))


@pytest.mark.parametrize("name", ["epsilon", "v_prediction", "rectified_flow"])
def test_sample_timesteps_are_in_range_and_reproducible(name):
    objective = TrainingObjective(name, num_train_timesteps=1000)
    first = objective.sample_timesteps(4096, generator=torch.Generator().manual_seed(3))
    again = objective.sample_timesteps(4096, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(first, again)
    if name == "rectified_flow":
        assert first.is_floating_point() and 0 < first.min() and first.max() < 1
        assert 0.45 < first.mean() < 0.55  # logit-normal is symmetric around 0.5
    else:
        assert first.dtype == torch.long and first.min() >= 0 and first.max() <= 999
        assert first.float().std() > 250  # spread over the whole schedule, not one level


def _oracle(objective: TrainingObjective, clean: torch.Tensor):
    """A perfect model for data that is always ``clean``: it returns the exact training target.

    The noise hidden in x_t is solved for with the objective's own forward process (x_t is linear in the noise), so
    the sampler only recovers ``clean`` if it reads the prediction the way the objective defined it.
    """

    def predict(sample: torch.Tensor, model_timestep: torch.Tensor) -> torch.Tensor:
        per_sample = model_timestep.reshape(1).expand(sample.shape[0])
        timesteps = per_sample / objective.num_train_timesteps if objective.is_flow else per_sample.long()
        zero = torch.zeros_like(sample)
        signal_only = objective.noisy_and_target(clean, zero, timesteps)[0]
        noise_scale = objective.noisy_and_target(zero, torch.ones_like(sample), timesteps)[0]
        noise = (sample - signal_only) / noise_scale
        return objective.noisy_and_target(clean, noise, timesteps)[1]

    return predict


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize(("name", "scheduler_name"), SAMPLERS)
def test_oracle_model_sampled_from_pure_noise_lands_on_the_clean_latents(name, scheduler_name, shape):
    clean, noise = _latents_and_noise(shape, seed=1)
    objective = TrainingObjective(name)
    scheduler = build_inference_scheduler(name, scheduler_name, objective.num_train_timesteps)
    model = _oracle(objective, clean)
    generator = torch.Generator().manual_seed(0)

    scheduler.set_timesteps(5)
    sample = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    for timestep in scheduler.timesteps:
        step_kwargs = {"generator": generator} if scheduler_name == "ddpm" else {}
        sample = scheduler.step(model(sample, timestep), timestep, sample, **step_kwargs).prev_sample

    assert sample.shape == clean.shape
    assert (noise - clean).abs().max() > 1  # the start really is far from the answer
    torch.testing.assert_close(sample, clean, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize(("name", "scheduler_name"), SAMPLERS)
def test_clip_bounds_the_implied_clean_latents_and_touches_nothing_else(name, scheduler_name):
    clean, noise = _latents_and_noise(SHAPES["3d"], seed=2)
    clean = clean * 3  # some values beyond the limit below
    objective = TrainingObjective(name)
    scheduler = build_inference_scheduler(name, scheduler_name)
    scheduler.set_timesteps(10)
    timestep = scheduler.timesteps[3]
    sample = noise
    exact = _oracle(objective, clean)(sample, timestep)

    # The implied x0 of the exact target is the clean latents, for every prediction type.
    torch.testing.assert_close(objective.clean_and_noise(sample, exact, timestep)[0], clean, atol=1e-3, rtol=1e-3)
    clipped = objective.clip_output(sample, exact, timestep, limit=2.0)
    implied = objective.clean_and_noise(sample, clipped, timestep)[0]
    torch.testing.assert_close(implied, clean.clamp(-2, 2), atol=1e-3, rtol=1e-3)
    inside = clean.abs() < 2
    torch.testing.assert_close(clipped[inside], exact[inside], atol=1e-3, rtol=1e-3)
    assert not torch.allclose(clipped[~inside], exact[~inside], atol=1e-2)


@pytest.mark.parametrize(("name", "scheduler_name"), SAMPLERS)
def test_one_noise_path_for_training_targets_and_sampler_timesteps(name, scheduler_name):
    """noised / output_for / clean_and_noise invert one another at the timesteps a sampler visits, and the noised
    latents are what the scheduler's own forward process gives (add_noise, or scale_noise for rectified flow)."""
    clean, noise = _latents_and_noise(SHAPES["2d"], seed=4)
    objective = TrainingObjective(name)
    scheduler = build_inference_scheduler(name, scheduler_name)
    scheduler.set_timesteps(10)
    timestep = scheduler.timesteps[4]
    noisy = objective.noised(clean, noise, timestep)
    steps = timestep.reshape(1).expand(len(clean))
    expected = scheduler.scale_noise(clean, steps, noise) if objective.is_flow else scheduler.add_noise(clean, noise, steps)
    torch.testing.assert_close(noisy, expected, atol=1e-5, rtol=1e-5)
    recovered_clean, recovered_noise = objective.clean_and_noise(noisy, objective.output_for(noisy, clean, noise, timestep),
                                                                 timestep)
    torch.testing.assert_close(recovered_clean, clean, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(recovered_noise, noise, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("name", "scheduler_name", "allowed"),
    [
        ("epsilon", "flow_match_euler", "ddpm, ddim, dpm_solver"),
        ("v_prediction", "flow_match_euler", "ddpm, ddim, dpm_solver"),
        ("rectified_flow", "ddim", "flow_match_euler"),
        ("rectified_flow", "dpm_solver", "flow_match_euler"),
        ("v_prediction", "euler_ancestral", "ddpm, ddim, dpm_solver"),
    ],
)
def test_mismatched_objective_and_scheduler_are_refused(name, scheduler_name, allowed):
    with pytest.raises(UserInputError) as caught:
        build_inference_scheduler(name, scheduler_name)
    assert caught.value.where == "sampling.scheduler"
    assert scheduler_name in caught.value.problem
    assert allowed in caught.value.allowed
    assert str(caught.value).startswith("sampling.scheduler: ")


def test_unknown_objective_is_a_user_error():
    with pytest.raises(UserInputError, match="diffusion.objective: unknown objective 'x0'"):
        TrainingObjective("x0")
    with pytest.raises(UserInputError, match="diffusion.objective"):
        build_inference_scheduler("x0", "ddim")


@pytest.mark.parametrize(("name", "scheduler_name"), SAMPLERS)
def test_inference_scheduler_uses_the_training_prediction_type(name, scheduler_name):
    scheduler = build_inference_scheduler(name, scheduler_name, num_train_timesteps=500)
    assert scheduler.config.num_train_timesteps == 500
    if name != "rectified_flow":
        assert scheduler.config.prediction_type == name
        training = TrainingObjective(name, num_train_timesteps=500).noise_scheduler
        torch.testing.assert_close(scheduler.alphas_cumprod, training.alphas_cumprod)


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm", "dpm_solver"])
def test_a_base_s_own_noise_schedule_reaches_training_sampling_and_the_consistency_sampler(scheduler):
    """A model fine-tuned from a pretrained base is trained and sampled under the base's betas, not radsynth's."""
    from diffusers import DDPMScheduler

    from radsynth.generators.consistency import ConsistencyScheduler
    from radsynth.generators.objectives import NOISE_SCHEDULE

    stable_diffusion = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    reference = DDPMScheduler(**stable_diffusion).alphas_cumprod
    trained = TrainingObjective("epsilon", noise_schedule=stable_diffusion).noise_scheduler.alphas_cumprod
    sampled = build_inference_scheduler("epsilon", scheduler, noise_schedule=stable_diffusion).alphas_cumprod
    student = ConsistencyScheduler("epsilon", noise_schedule=stable_diffusion).objective.noise_scheduler.alphas_cumprod
    for alphas in (trained, sampled, student):
        torch.testing.assert_close(alphas, reference)
    default = build_inference_scheduler("epsilon", scheduler).alphas_cumprod
    torch.testing.assert_close(default, DDPMScheduler(**NOISE_SCHEDULE).alphas_cumprod)
    assert not torch.allclose(default, reference)


def test_min_snr_weights_are_diffusers_closed_forms_and_none_when_off():
    timesteps = torch.tensor([0, 10, 200, 500, 999])
    alpha_bar = TrainingObjective("epsilon").noise_scheduler.alphas_cumprod[timesteps].double()
    snr = alpha_bar / (1 - alpha_bar)
    capped = snr.clamp(max=5.0)
    epsilon = TrainingObjective("epsilon", min_snr_gamma=5.0).loss_weights(timesteps)
    v = TrainingObjective("v_prediction", min_snr_gamma=5.0).loss_weights(timesteps)
    torch.testing.assert_close(epsilon.double(), capped / snr, rtol=1e-5, atol=0)
    torch.testing.assert_close(v.double(), capped / (snr + 1), rtol=1e-5, atol=0)
    assert epsilon[-1] == pytest.approx(1.0) and epsilon[0] < 0.01  # noisy steps kept, clean ones scaled down
    assert TrainingObjective("v_prediction").loss_weights(timesteps) is None

    t = torch.tensor([0.01, 0.3, 0.5, 0.9])
    flow = TrainingObjective("rectified_flow", min_snr_gamma=5.0).loss_weights(t).double()
    # velocity error = clean-latent error / t, so the clean-latent weight min(SNR, gamma) times t^2
    torch.testing.assert_close(flow, (((1 - t) / t) ** 2).double().clamp(max=5.0) * t.double() ** 2, rtol=1e-5, atol=0)



def test_min_snr_scales_each_sample_s_training_loss_by_its_weight():
    from .test_distillation import tiny_teacher

    model, latents = tiny_teacher("v_prediction")
    batch = latents.batch(range(4), torch.Generator().manual_seed(0))
    condition = model.condition(batch["prompts"], spacing=batch["spacing"])
    noise, timesteps = torch.randn(batch["latents"].shape), torch.tensor([3, 250, 600, 990])
    with torch.no_grad():
        plain = model.losses(batch["latents"], condition, noise, timesteps)
        model.objective = TrainingObjective("v_prediction", min_snr_gamma=2.0)
        weighted = model.losses(batch["latents"], condition, noise, timesteps)
    torch.testing.assert_close(weighted, plain * model.objective.loss_weights(timesteps))
    assert weighted[0] < 0.05 * plain[0]  # the nearly clean sample barely counts

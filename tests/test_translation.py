"""Cross-modality translation by dual diffusion implicit bridges: the deterministic walk up the probability-flow path
inverts the walk down, the target prompt and the label map reach the output, and the path is the objective's."""

from __future__ import annotations

import pytest
import torch

from radsynth.generators.controlnet import RadsynthControlNet
from radsynth.generators.objectives import TrainingObjective
from radsynth.pipelines.sampling.translation import RadsynthTranslationPipeline

from .test_controlnet import as_if_trained_controlnet
from .test_sampling_pipeline import PROMPTS, SHAPES, make_pipeline

OBJECTIVES = [("v_prediction", "ddim"), ("epsilon", "ddim"), ("rectified_flow", "flow_match_euler")]


def translation_pipeline(spatial_dims: int, objective: str = "v_prediction", scheduler: str = "ddim",
                         with_controlnet: bool = False) -> RadsynthTranslationPipeline:
    base = make_pipeline(spatial_dims, objective, scheduler, modality="ct+mri")
    controlnet = None
    if with_controlnet:
        controlnet = RadsynthControlNet.from_unet(base.unet, num_labels=3, downsample_factor=base.vae.downsample_factor)
        controlnet = as_if_trained_controlnet(controlnet).eval()
    return RadsynthTranslationPipeline.from_pipe(base, mask_controlnet=controlnet)


def source_images(spatial_dims: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((len(PROMPTS), 1, *SHAPES[spatial_dims]), generator=generator) * 1.6 - 0.8


class GaussianOracle(torch.nn.Module):
    """The exact denoiser of latents drawn from N(0, std^2): E[clean | x_t] = signal std^2 / (signal^2 std^2 +
    noise_level^2) x_t, returned as the objective's output. Its probability-flow path is known in closed form: the
    walk up to t scales the clean latents by sqrt(signal^2 std^2 + noise_level^2) / std, the walk down undoes it."""

    config = {"use_spacing": False}

    def __init__(self, objective: TrainingObjective, std: float):
        super().__init__()
        self.objective, self.std = objective, std
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # LatentDiffusion reads device and dtype off a parameter

    def forward(self, sample, timestep, encoder_hidden_states=None, class_labels=None, spacing=None):
        signal, noise_level = self.objective.levels(timestep, sample)
        spread = signal**2 * self.std**2 + noise_level**2
        clean, noise = signal * self.std**2 / spread * sample, noise_level / spread * sample
        return self.objective.output_for(sample, clean, noise, timestep).float()

    def spread(self, timestep) -> float:
        signal, noise_level = self.objective.levels(torch.as_tensor(timestep), torch.zeros(1))
        return float((signal**2 * self.std**2 + noise_level**2).sqrt()) / self.std


@pytest.mark.parametrize(("objective", "scheduler"), OBJECTIVES)
def test_the_walk_up_follows_the_exact_flow_and_the_walk_down_inverts_it_ever_closer_with_more_steps(
        objective, scheduler):
    diffusion = translation_pipeline(2, objective, scheduler).diffusion()
    oracle = diffusion.denoiser = GaussianOracle(diffusion.objective, std=0.5)
    diffusion.latent_clip = None
    condition = diffusion.condition(PROMPTS)
    start = 0.5 * torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(1))

    def walks(steps: int) -> tuple[float, float]:
        path = diffusion.objective.path_timesteps(0.9, steps)
        up = diffusion.travel(start, condition, path)
        back = diffusion.travel(up, condition, path.flip(0), land_clean=True)
        exact_up = start * oracle.spread(path[-1]) / oracle.spread(path[0])
        return float((up - exact_up).abs().max() / exact_up.abs().max()), float((back - start).abs().max())

    (up_coarse, back_coarse), (up_fine, back_fine) = walks(8), walks(1024)
    assert oracle.spread(diffusion.objective.path_timesteps(0.9, 8)[-1]) > 1.5  # the walk up really goes somewhere
    assert up_fine < 0.1 * up_coarse and up_fine < 0.03  # first order: 128x the steps
    assert back_fine < 0.1 * back_coarse and back_fine < 0.03


@pytest.mark.parametrize("objective", ["v_prediction", "rectified_flow"])
def test_path_runs_from_the_clean_end_to_the_strength_in_the_objective_s_units(objective):
    path = TrainingObjective(objective).path_timesteps(0.5, 10)
    assert path[0] == 0 and (path.diff() > 0).all()
    top = 500.0 if objective == "rectified_flow" else round(0.5 * 999)
    assert float(path[-1]) == pytest.approx(top)
    with pytest.raises(ValueError, match="strength"):
        TrainingObjective(objective).path_timesteps(0.0, 10)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_the_target_prompt_redraws_the_image_and_the_source_prompt_alone_keeps_it(spatial_dims):
    # Rectified flow: the random model's straightest path, so that 100 steps each way invert closely.
    pipeline = translation_pipeline(spatial_dims, "rectified_flow", "flow_match_euler")
    images, source, target = source_images(spatial_dims), PROMPTS, PROMPTS[::-1]
    kept = pipeline(images, source, source, strength=0.5, num_inference_steps=200, guidance_scale=1.0).images
    moved = pipeline(images, source, target, strength=0.5, num_inference_steps=200, guidance_scale=1.0).images
    with torch.no_grad():
        reconstructed = pipeline.decode(pipeline.diffusion().encode(images)).numpy()

    assert kept.shape == moved.shape == tuple(images.shape)
    assert -1 <= moved.min() and moved.max() <= 1
    # Same prompt both ways: the bridge is the autoencoder's round trip; another prompt moves the image further.
    assert abs(kept - reconstructed).mean() < 0.35 * abs(moved - reconstructed).mean()
    again = pipeline(images, source, target, strength=0.5, num_inference_steps=200, guidance_scale=1.0).images
    assert (again == moved).all()  # deterministic: no noise is drawn


def test_label_maps_steer_both_walks_through_the_controlnet():
    pipeline = translation_pipeline(2, with_controlnet=True)
    images, prompts = source_images(2), PROMPTS[::-1]
    blank = torch.zeros((len(PROMPTS), 1, *SHAPES[2]), dtype=torch.long)
    organ = blank.clone()
    organ[:, 0, 4:12, 4:12] = 2
    plain = pipeline(images, PROMPTS, prompts, num_inference_steps=10).images
    with_blank = pipeline(images, PROMPTS, prompts, label_maps=blank, num_inference_steps=10).images
    with_organ = pipeline(images, PROMPTS, prompts, label_maps=organ, num_inference_steps=10).images
    assert abs(with_organ - with_blank).mean() > 1e-3 and abs(with_blank - plain).mean() > 1e-3
    with pytest.raises(ValueError, match="ControlNet"):
        translation_pipeline(2)(images, PROMPTS, prompts, label_maps=organ, num_inference_steps=4)


def test_images_off_the_grid_or_prompts_that_do_not_pair_are_refused():
    pipeline = translation_pipeline(2)
    with pytest.raises(ValueError, match="shape"):
        pipeline(torch.zeros(2, 1, 8, 8), PROMPTS, PROMPTS)
    with pytest.raises(ValueError, match="prompt"):
        pipeline(source_images(2), PROMPTS, PROMPTS[:1])

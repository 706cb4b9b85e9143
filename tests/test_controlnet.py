"""RadsynthControlNet: label maps of any vocabulary size steer a frozen UNet (tiny 2D and 3D configs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from radsynth.generators.controlnet import ControlLossWeights, RadsynthControlNet, one_hot_labels, rare_labels
from radsynth.generators.data import CachedLatents
from radsynth.generators.diffusion_trainer import DiffusionTrainer
from radsynth.generators.latent_diffusion import Conditioning, LatentDiffusion
from radsynth.generators.objectives import TrainingObjective
from radsynth.generators.text_encoder import load_text_encoder
from radsynth.generators.trainer import LoopSettings, read_metrics
from radsynth.generators.unet import RadsynthUNet

from .test_generator_models import TINY_UNET, as_if_trained, assert_saved_without_pickle, text_tokens


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def tiny_pair(spatial_dims: int, num_labels: int, **unet_extra) -> tuple[RadsynthUNet, RadsynthControlNet]:
    unet = as_if_trained(RadsynthUNet(spatial_dims=spatial_dims, **TINY_UNET, **unet_extra))
    return unet, RadsynthControlNet.from_unet(unet, num_labels=num_labels, downsample_factor=4)


def as_if_trained_controlnet(controlnet: RadsynthControlNet) -> RadsynthControlNet:
    """Its zero convolutions moved off zero, as training would."""
    for parameter in controlnet.parameters():
        if not parameter.any():
            parameter.data.normal_(0.0, 0.2)
    return controlnet


def steered(unet, controlnet, sample, timestep, tokens, label_map, scale=1.0, spacing=None, class_labels=None):
    context = unet.conditioning_context(tokens, spacing)
    down, mid = controlnet(sample, timestep, context, label_map, conditioning_scale=scale, class_labels=class_labels)
    return unet(sample, timestep, tokens, class_labels=class_labels, spacing=spacing,
                down_block_additional_residuals=down, mid_block_additional_residual=mid)


def test_one_hot_labels_has_a_channel_per_label_and_rejects_labels_outside_the_vocabulary():
    labels = torch.tensor([[[0, 2], [1, 2]]]).unsqueeze(1)  # (B=1, 1, 2, 2)
    one_hot = one_hot_labels(labels, 4)
    assert one_hot.shape == (1, 4, 2, 2) and one_hot.dtype == torch.float32
    assert torch.equal(one_hot.argmax(1), labels[:, 0]) and torch.equal(one_hot.sum(1), torch.ones(1, 2, 2))
    assert not one_hot[:, 3].any()  # label 3 is in the vocabulary but not in this map
    with pytest.raises(ValueError, match="0..3"):
        one_hot_labels(labels + 2, 4)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@torch.no_grad()
def test_a_new_controlnet_leaves_the_base_model_unchanged_and_copies_its_encoder(spatial_dims):
    unet, controlnet = tiny_pair(spatial_dims, num_labels=5)
    sample, tokens = torch.randn(2, 4, *(8,) * spatial_dims), text_tokens(2)
    labels = torch.randint(0, 5, (2, 1, *(32,) * spatial_dims))
    # Zero-initialised outputs: exactly the base prediction, whatever the label map.
    assert torch.equal(steered(unet, controlnet, sample, 300, tokens, labels), unet(sample, 300, tokens))
    for name, weight in unet.net.state_dict().items():
        if name.startswith(("down_blocks.", "middle_block.", "time_embed.", "conv_in.")):
            assert torch.equal(controlnet.net.state_dict()[name], weight), name


@pytest.mark.parametrize("spatial_dims", [2, 3])
@torch.no_grad()
def test_a_trained_controlnet_steers_by_the_label_map_in_proportion_to_its_scale(spatial_dims):
    unet, controlnet = tiny_pair(spatial_dims, num_labels=3)
    controlnet = as_if_trained_controlnet(controlnet)
    sample, tokens = torch.randn(1, 4, *(8,) * spatial_dims), text_tokens(1)
    empty = torch.zeros(1, 1, *(32,) * spatial_dims, dtype=torch.long)
    lesion = empty.clone()
    lesion[(0, 0, *(slice(8, 20),) * spatial_dims)] = 2
    base = unet(sample, 300, tokens)
    with_lesion = steered(unet, controlnet, sample, 300, tokens, lesion)
    assert not torch.allclose(with_lesion, steered(unet, controlnet, sample, 300, tokens, empty))
    assert torch.equal(steered(unet, controlnet, sample, 300, tokens, lesion, scale=0.0), base)
    # Integer labels and their one-hot are the same input.
    assert torch.equal(steered(unet, controlnet, sample, 300, tokens, one_hot_labels(lesion, 3)), with_lesion)


def test_a_hundred_and_thirty_label_vocabulary_works():
    unet, controlnet = tiny_pair(3, num_labels=132)
    assert controlnet.net.controlnet_cond_embedding.conv_in.conv.in_channels == 132
    labels = torch.randint(0, 132, (1, 1, 16, 16, 16))
    with torch.no_grad():
        down, mid = controlnet(torch.randn(1, 4, 4, 4, 4), 10, text_tokens(1), labels)
    assert mid.shape[0] == 1 and all(torch.isfinite(residual).all() for residual in down)


def test_controlnet_round_trip_keeps_outputs(tmp_path):
    unet, controlnet = tiny_pair(3, num_labels=4, num_class_embeds=3, use_spacing=True)
    controlnet = as_if_trained_controlnet(controlnet)
    folder = tmp_path / "mask_controlnet"  # not "controlnet": diffusers would take that folder for its own
    controlnet.save_pretrained(folder)
    assert_saved_without_pickle(folder)
    loaded = RadsynthControlNet.from_pretrained(folder, use_safetensors=True)
    assert loaded.config.num_labels == 4 and loaded.config.downsample_factor == 4
    inputs = dict(sample=torch.randn(2, 4, 8, 8, 8), timestep=torch.tensor([5.0, 700.0]), tokens=text_tokens(2),
                  label_map=torch.randint(0, 4, (2, 1, 32, 32, 32)), scale=0.7,
                  spacing=torch.tensor([[1.0, 1.0, 1.5], [0.8, 0.8, 3.0]]), class_labels=torch.tensor([0, 2]))
    with torch.no_grad():
        expected = steered(unet, controlnet, **inputs)
        assert not torch.allclose(expected, unet(inputs["sample"], inputs["timestep"], inputs["tokens"],
                                                 class_labels=inputs["class_labels"], spacing=inputs["spacing"]))
        assert torch.equal(steered(unet, loaded, **inputs), expected)


def test_shape_mismatches_are_named():
    unet, controlnet = tiny_pair(2, num_labels=3)
    sample, tokens = torch.randn(1, 4, 8, 8), text_tokens(1)
    with pytest.raises(ValueError, match=r"\(B, 3, \*\(32, 32\)\)"):
        controlnet(sample, 10, tokens, torch.zeros(1, 1, 16, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="power of 2"):
        RadsynthControlNet(num_labels=3, downsample_factor=3)
    with pytest.raises(ValueError, match="at least 2 labels"):
        RadsynthControlNet(num_labels=1)


# ----------------------------------------------------------------------------------------------- training


def mask_dependent_latents(n: int = 16) -> tuple[CachedLatents, torch.Tensor]:
    """Latents that are +1 where a square label sits and -1 elsewhere: only the label map can tell them apart."""
    label_maps = torch.zeros(n, 1, 32, 32, dtype=torch.long)
    for i in range(n):
        row, column = divmod(i % 9, 3)
        label_maps[i, 0, 8 * row + 2:8 * row + 14, 8 * column + 2:8 * column + 14] = 1 + i % 2
    coarse = torch.nn.functional.avg_pool2d((label_maps > 0).float(), 4) * 2 - 1
    latents = CachedLatents(coarse.expand(-1, 4, -1, -1).clone(), torch.full((n, 4, 8, 8), 0.01),
                            ["chest radiograph"] * n, torch.ones(n, 2))
    latents.label_maps = label_maps
    return latents, label_maps


def controlnet_trainer(tmp_path, max_steps: int) -> DiffusionTrainer:
    """A ControlNet trained beside a frozen UNet and text encoder: the one DiffusionTrainer, told what trains."""
    torch.manual_seed(0)
    unet = as_if_trained(RadsynthUNet(spatial_dims=2, **TINY_UNET))
    text_encoder = load_text_encoder("trained", captions=["chest radiograph"], max_length=8, embed_dim=16,
                                     num_layers=1, num_heads=2)
    controlnet = RadsynthControlNet.from_unet(unet, num_labels=3, downsample_factor=4)
    latents, _ = mask_dependent_latents()
    settings = LoopSettings(max_steps=max_steps, checkpoint_every=max_steps, log_every=1, device="cpu", progress=False)
    diffusion = LatentDiffusion(unet, None, text_encoder, TrainingObjective("v_prediction"), controlnet=controlnet)
    return DiffusionTrainer(diffusion, [controlnet], latents, tmp_path, settings, learning_rate=3e-3,
                            lr_schedule="constant", warmup_steps=0, batch_size=8, condition_dropout=0.1,
                            max_grad_norm=1.0, ema_decay=None, seed=0)


@torch.no_grad()
def held_out_loss(trainer: DiffusionTrainer, label_maps: torch.Tensor) -> float:
    """The denoising loss on every case at fixed noise and timesteps, given these label maps."""
    generator = torch.Generator().manual_seed(99)
    latents, diffusion = trainer.latents, trainer.diffusion
    clean = latents.mu
    noise = torch.randn(clean.shape, generator=generator)
    timesteps = diffusion.objective.sample_timesteps(len(clean), device="cpu", generator=generator)
    condition = diffusion.condition(latents.prompts, spacing=latents.spacing, label_maps=label_maps)
    return diffusion.losses(clean, condition, noise, timesteps).mean().item()


def test_controlnet_training_learns_from_the_label_map_and_leaves_the_base_model_frozen(tmp_path):
    trainer = controlnet_trainer(tmp_path, max_steps=80)
    unet, text_encoder = trainer.diffusion.denoiser, trainer.diffusion.text_encoder
    frozen = {name: weight.clone() for module in (unet, text_encoder) for name, weight in module.state_dict().items()}
    trainer.fit()
    for module in (unet, text_encoder):
        for name, weight in module.state_dict().items():
            assert torch.equal(weight, frozen[name]), f"base weight {name} moved"
    losses = read_metrics(tmp_path / "metrics.csv", "loss")
    first, last = np.mean([losses[s] for s in range(1, 6)]), np.mean([losses[s] for s in range(76, 81)])
    assert last < 0.8 * first, (first, last)
    with trainer.inference_weights() as (controlnet,):
        assert not controlnet.training
        # What it learnt comes from the label map: the right maps predict better than empty ones.
        _, label_maps = mask_dependent_latents()
        right, empty = held_out_loss(trainer, label_maps), held_out_loss(trainer, torch.zeros_like(label_maps))
        assert right < 0.95 * empty, (right, empty)  # exactly equal before training (zero convolutions)
        trained_path = tmp_path / "mask_controlnet"
        controlnet.save_pretrained(trained_path)
    assert any(weight.any() for name, weight in RadsynthControlNet.from_pretrained(trained_path).state_dict().items()
               if "zero" in name or "controlnet_down_blocks" in name)


def test_control_loss_weights_favour_the_latents_under_rare_labels_whatever_the_latents():
    # 100 maps of 8x8: an organ of 16 pixels in each, a 2x2 finding in the top-left corner of 10 of them
    # -> shares 0.75, 0.25 and 0.00625: only the finding is rare.
    maps = torch.zeros(100, 1, 8, 8, dtype=torch.long)
    maps[:, :, 4:, 4:] = 1
    maps[:10, :, :2, :2] = 2
    rare = rare_labels(maps, 3)
    assert rare.tolist() == [False, False, True]
    weights = ControlLossWeights(rare, rare_weight=8.0, factor=4)  # 8x8 images, 2x2 latents
    condition = Conditioning(context=torch.zeros(2, 1, 4), control=one_hot_labels(maps[9:11], 3))
    for clean in (torch.zeros(2, 3, 2, 2), torch.randn(2, 3, 2, 2)):
        found = weights(clean, condition)
        # The finding covers 4 of the top-left latent's 16 pixels: 1 + 8 x 0.25; the map without one: all 1.
        torch.testing.assert_close(found[0, 0], torch.tensor([[3.0, 1.0], [1.0, 1.0]]))
        torch.testing.assert_close(found[1], torch.ones(1, 2, 2))

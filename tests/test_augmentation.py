"""Non-leaking augmentation: each transform is what its label says, the UNet reads the label (zero at sampling),
and a model trained on flipped copies still draws the unflipped data at the zero label."""

import math

import pytest
import torch

from radsynth.configs import load_config
from radsynth.generators.augmentation import LatentAugment, reflect_shift
from radsynth.generators.data import CachedLatents
from radsynth.generators.diffusion_trainer import DiffusionTrainer
from radsynth.generators.latent_diffusion import LatentDiffusion
from radsynth.generators.objectives import TrainingObjective
from radsynth.generators.text_encoder import load_text_encoder
from radsynth.generators.trainer import LoopSettings
from radsynth.generators.unet import RadsynthUNet
from radsynth.pipelines.data.ingest import ingest
from radsynth.pipelines.sampling.text_to_image import RadsynthTextToImagePipeline
from radsynth.pipelines.training import latent_augment, train

from .test_generator_models import TINY_UNET, as_if_trained
from .test_training_stage import tiny_config


def replayed(original: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """The transform a label describes, applied to ``original`` (C, *spatial) independently of the code under
    test's order of draws: flips, then the quarter turn, then the reflected shift."""
    spatial = original.shape[1:]
    dims = len(spatial)
    case = original
    for axis in range(dims):
        if label[axis] == 1:
            case = case.flip(axis + 1)
    cos, sin = float(label[dims]) + 1, float(label[dims + 1])
    turns = round(math.atan2(sin, cos) / (math.pi / 2)) % 4
    if turns:
        case = torch.rot90(case, turns, dims=(dims - 1, dims))
    shifts = [round(float(f) * n) for f, n in zip(label[dims + 2 :], spatial)]
    return reflect_shift(case, shifts)


def test_reflect_shift_mirrors_what_enters_at_the_border():
    row = torch.arange(5.0).reshape(1, 5)
    assert reflect_shift(row, [2]).tolist() == [[2.0, 1.0, 0.0, 1.0, 2.0]]
    assert reflect_shift(row, [-2]).tolist() == [[2.0, 3.0, 4.0, 3.0, 2.0]]
    assert reflect_shift(row, [0]).tolist() == row.tolist()
    with pytest.raises(ValueError, match="smaller than the axis"):
        reflect_shift(row, [5])


@pytest.mark.parametrize("shape", [(4, 8, 8), (3, 6, 8, 8)])
def test_every_transform_is_what_its_label_says_and_zero_means_untouched(shape):
    latents = torch.randn(64, *shape)
    augmented, labels = LatentAugment(0.5, max_shift=0.25)(latents, torch.Generator().manual_seed(0))
    assert labels.shape == (64, LatentAugment.label_dims(len(shape) - 1))
    for original, case, label in zip(latents, augmented, labels):
        assert torch.equal(case, replayed(original, label))
    untouched = (labels == 0).all(dim=1)
    assert torch.equal(augmented[untouched], latents[untouched])
    assert 0 < int(untouched.sum()) < 64  # at 0.5 per transform: 1/16 of cases (2D), 1/32 (3D) expected
    # Each kind was drawn: flips, turns (square last axes), shifts
    dims = len(shape) - 1
    assert labels[:, :dims].any() and labels[:, dims : dims + 2].any() and labels[:, dims + 2 :].any()


def test_probability_zero_is_the_identity_and_the_random_stream_advances_alike():
    latents = torch.randn(8, 4, 8, 8)
    off, on = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    same, labels = LatentAugment(0.0)(latents, off)
    moved, _ = LatentAugment(1.0)(latents, on)
    assert torch.equal(same, latents) and not labels.any()
    assert not torch.equal(moved, latents)
    # The draws after it (noise, timesteps) do not depend on which transforms were chosen
    assert torch.equal(off.get_state(), on.get_state())


def test_no_quarter_turn_on_a_grid_whose_last_two_axes_differ():
    _, labels = LatentAugment(1.0, flip=False, max_shift=0.0)(torch.randn(16, 4, 8, 6), torch.Generator())
    assert not labels.any()


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="probability"):
        LatentAugment(1.5)
    with pytest.raises(ValueError, match="max_shift"):
        LatentAugment(0.5, max_shift=0.5)


def test_the_unet_reads_the_label_as_a_token_and_none_means_no_transform(tmp_path):
    torch.manual_seed(0)
    dims = LatentAugment.label_dims(2)
    unet = as_if_trained(RadsynthUNet(spatial_dims=2, **TINY_UNET, augment_dims=dims)).eval()
    sample, tokens = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 16)
    plain = unet(sample, 10, tokens)
    assert torch.equal(plain, unet(sample, 10, tokens, augment=torch.zeros(2, dims)))
    flipped = torch.zeros(2, dims)
    flipped[:, 0] = 1
    assert not torch.allclose(plain, unet(sample, 10, tokens, augment=flipped))
    assert unet.conditioning_context(tokens).shape == (2, 4, 16)  # text + the augmentation token
    with pytest.raises(ValueError, match="augment must have shape"):
        unet(sample, 10, tokens, augment=torch.zeros(2, dims + 1))
    unet.save_pretrained(tmp_path)
    loaded = RadsynthUNet.from_pretrained(tmp_path).eval()
    assert loaded.config.augment_dims == dims
    assert torch.equal(loaded(sample, 10, tokens, augment=flipped), unet(sample, 10, tokens, augment=flipped))


def test_config_turns_augmentation_on_only_with_a_probability(tmp_path):
    assert latent_augment(load_config("demo", [f"runtime.output_dir={tmp_path}"])) is None
    chosen = latent_augment(load_config("demo", [f"runtime.output_dir={tmp_path}", "diffusion.augment.probability=0.3",
                                                 "diffusion.augment.rotate=false"]))
    assert chosen == LatentAugment(0.3, flip=True, rotate=False, max_shift=0.125)


def test_a_model_trained_on_flipped_copies_draws_the_unflipped_data_at_the_zero_label(tmp_path):
    """Known answer: the data is one left-to-right ramp, flipped in half the training cases. A model told which
    cases were flipped predicts the ramp at the zero label (and its mirror at the flip label); one not told (the
    leak) predicts their average, a flat image."""
    torch.manual_seed(0)
    ramp = torch.linspace(-1.5, 1.5, 8).expand(4, 8, 8).clone()  # (C, H, W), rising along W
    dims = LatentAugment.label_dims(2)
    unet = RadsynthUNet(spatial_dims=2, **TINY_UNET, augment_dims=dims)
    text = load_text_encoder("trained", captions=["chest"], embed_dim=16, num_layers=1, num_heads=2)
    objective = TrainingObjective("v_prediction", 1000)
    core = LatentDiffusion(unet, None, text, objective)
    latents = CachedLatents(ramp.expand(16, -1, -1, -1).clone(), torch.zeros(16, 4, 8, 8), ["chest"] * 16,
                            torch.ones(16, 2))
    only_width_flips = LatentAugment(0.5, flip=True, rotate=False, max_shift=0.0)
    trainer = DiffusionTrainer(core, [unet], latents, tmp_path, LoopSettings(max_steps=250, progress=False,
                                                                           checkpoint_every=1000, device="cpu"),
                               learning_rate=3e-3, lr_schedule="constant", warmup_steps=0, batch_size=8,
                               condition_dropout=0.0, max_grad_norm=1.0, ema_decay=None, seed=0,
                               augment=only_width_flips)
    trainer.fit()
    unet.eval()

    def predicted_clean(augment: torch.Tensor | None) -> torch.Tensor:
        """The clean latents implied at a noisy step (no data left to read), as a profile along the width."""
        timesteps = torch.full((4,), 700)
        noisy = objective.noised(torch.zeros(4, 4, 8, 8), torch.randn(4, 4, 8, 8, generator=torch.Generator()
                                                                      .manual_seed(1)), timesteps)
        with torch.no_grad():
            output = core.predict(noisy, timesteps, core.condition(["chest"] * 4, augment=augment))
        return objective.clean_and_noise(noisy, output, timesteps)[0].mean(dim=(0, 1, 2))

    plain = predicted_clean(None)
    flip_label = torch.zeros(4, dims)
    flip_label[:, 1] = 1  # the width axis (dim 1 of H, W) flipped
    mirrored = predicted_clean(flip_label)
    rising = torch.linspace(-1, 1, 8)
    assert float(plain @ rising) > 0.5 * float(ramp[0, 0] @ rising)  # the ramp rises, as every untouched case
    assert float(mirrored @ rising) < -0.5 * float(ramp[0, 0] @ rising)  # told "flipped": the mirror image


def test_training_with_augmentation_saves_a_model_that_reads_labels_and_says_so(tmp_path):
    config = tiny_config(tmp_path, "diffusion.max_steps=4", "diffusion.validate_every=100",
                         "diffusion.augment.probability=0.5")
    ingest(config, progress=False)
    result = train(config, progress=False)
    unet = RadsynthUNet.from_pretrained(result.model_dir / "unet")
    assert unet.config.augment_dims == LatentAugment.label_dims(2)
    assert "non-leaking augmentation of the training latents" in (result.model_dir / "README.md").read_text()
    pipeline = RadsynthTextToImagePipeline.from_pretrained(result.model_dir, use_safetensors=True)
    image = pipeline(["finding: none."], num_inference_steps=2, output_type="pt").images
    assert image.shape[0] == 1 and torch.isfinite(image).all()

"""White-box generator probes: near copies (autoencoder round trip, partial-noise regeneration), the denoising
loss as the trainer computes it, and membership inference on a deliberately overfitted tiny model (AUC well
above 0.5) against a model with random weights (AUC about 0.5), plus known answers for AUC and TPR@1%FPR."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from radsynth.configs import load_config
from radsynth.generators.diffusion_trainer import DiffusionTrainer
from radsynth.generators.text_encoder import RadsynthTextEncoder
from radsynth.pipelines.data.ingest import ingest
from radsynth.pipelines.sampling.generate import load_pipeline
from radsynth.pipelines.sampling.text_to_image import RadsynthTextToImagePipeline
from radsynth.pipelines.scoring.generator_probes import (
    autoencoder_round_trip,
    denoising_losses,
    membership_inference,
    membership_inference_report,
    partial_noise_regeneration,
)
from radsynth.pipelines.scoring.image_sets import ImageSet
from radsynth.pipelines.scoring.loading import cached_split
from radsynth.pipelines.scoring.near_copies import NEAR_COPY_KINDS, near_copies
from radsynth.pipelines.scoring.privacy import pixel_nearest_neighbours, threshold_at_false_positive_rate
from radsynth.pipelines.scoring.roc import mann_whitney_auc, tpr_at_fpr
from radsynth.pipelines.training import train

from .test_sampling_pipeline import PROMPTS, make_pipeline
from .test_training_stage import tiny_config

# A model built to memorise: 9 training images (40 phantoms, 20% train), a 2x autoencoder trained well enough
# (500 steps, PSNR ~29 dB) that round trips land nearest their source and the 4 x 16 x 16 latents of the
# images are distinct, a two-level UNet (the CPU step cost is per-module overhead, so fewer modules train
# faster), no condition dropout, no EMA, constant lr 2e-3, 200 full-batch steps. Measured AUC (T = 10): 100
# steps 0.90, 150 steps 0.93, 200 steps 1.0. An autoencoder of only 40 steps (blurry, near-identical latents)
# needed 300 steps for 0.94, and 4 x 8 x 8 or 4 x 4 x 4 latents memorised far more slowly or not at all.
OVERFIT = ["data.phantom.n_cases=40", "data.split.train=0.2", "data.split.holdout=0.65", "data.split.test=0.15",
           "autoencoder.channels=[8,16]", "autoencoder.attention_levels=[false,false]", "autoencoder.max_steps=500",
           "diffusion.channels=[16,32]", "diffusion.attention_levels=[false,true]", "diffusion.batch_size=8",
           "diffusion.learning_rate=2e-3", "diffusion.lr_schedule=constant", "diffusion.max_steps=200",
           "diffusion.ema_decay=null", "diffusion.log_every=100", "diffusion.validate_every=100000",
           "conditioning.condition_dropout=0", "conditioning.class_attribute=finding"]


def as_batch(images: ImageSet) -> torch.Tensor:
    return torch.from_numpy(images.images).unsqueeze(1)


@pytest.fixture(scope="module")
def overfitted(tmp_path_factory):
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("overfit")
    config = tiny_config(run, *OVERFIT)
    ingest(config, progress=False)
    train(config, progress=False)
    pipeline = load_pipeline(run / "model", config, progress=False)
    pipeline.set_progress_bar_config(disable=True)
    return SimpleNamespace(config=config, pipeline=pipeline, train=cached_split(config, "train"),
                           holdout=cached_split(config, "holdout"))


def mean_squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(len(a), len(b)) mean squared pixel differences."""
    return torch.cdist(a.flatten(1).double(), b.flatten(1).double()) ** 2 / a[0].numel()


def random_weights_like(pipeline: RadsynthTextToImagePipeline, seed: int = 0) -> RadsynthTextToImagePipeline:
    """The same architecture with fresh random weights: an untrained model.

    MONAI zero-initialises the UNet's output and attention projections (a fresh UNet predicts 0 whatever its
    input); those are randomised too, so the untrained model's loss depends on the image like a trained one's.
    """
    torch.manual_seed(seed)
    vae = type(pipeline.vae).from_config(pipeline.vae.config)
    unet = type(pipeline.unet).from_config(pipeline.unet.config)
    text_encoder = RadsynthTextEncoder.from_config(pipeline.text_encoder.config)
    with torch.no_grad():
        for parameter in unet.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.1)
    fresh = RadsynthTextToImagePipeline(unet=unet, vae=vae, text_encoder=text_encoder, scheduler=pipeline.scheduler,
                                        **{k: v for k, v in pipeline.config.items() if not k.startswith("_")
                                           and k not in pipeline.components})
    for module in (vae, unet, text_encoder):
        module.eval()
    return fresh


# ------------------------------------------------------------------------------- AUC and TPR known answers


def test_auc_of_perfectly_separated_scores_is_one_and_of_reversed_scores_zero():
    assert mann_whitney_auc([5.0, 6.0, 7.0], [1.0, 2.0]) == 1.0
    assert mann_whitney_auc([1.0, 2.0], [5.0, 6.0, 7.0]) == 0.0


def test_auc_counts_ties_as_one_half():
    assert mann_whitney_auc([3.0, 3.0, 3.0], [3.0, 3.0]) == 0.5
    # Pairs (positive, negative): (1,2)=0 (1,0)=1 (2,2)=1/2 (2,0)=1 (2,2)=1/2 (2,0)=1 -> 4 of 6.
    assert mann_whitney_auc([1.0, 2.0, 2.0], [2.0, 0.0]) == pytest.approx(4 / 6)


def test_auc_of_two_samples_of_one_distribution_is_one_half():
    rng = np.random.default_rng(0)
    # SD of the AUC under the null with 5000 / 5000 samples: sqrt(10001 / (12 * 5000 * 5000)) = 0.0058.
    assert abs(mann_whitney_auc(rng.normal(size=5000), rng.normal(size=5000)) - 0.5) < 0.02
    # ... and it moves with a real shift: one SD of separation gives Phi(1 / sqrt(2)) = 0.760.
    assert mann_whitney_auc(rng.normal(1.0, size=5000), rng.normal(size=5000)) == pytest.approx(0.760, abs=0.02)


def test_tpr_at_one_percent_fpr_takes_the_best_threshold_with_at_most_one_percent_false_positives():
    negatives = np.arange(200.0)  # 200 non-members: at most 2 false positives, so the threshold is above 197
    positives = np.array([198.5, 199.5, 250.0, 197.0, 100.0])
    assert tpr_at_fpr(positives, negatives) == pytest.approx(3 / 5)
    # Ties with the (k+1)-th negative are not above the threshold: 197 is not counted.
    assert tpr_at_fpr(np.array([197.0]), negatives) == 0.0
    assert tpr_at_fpr(positives, negatives, max_fpr=1.0) == 1.0
    result = membership_inference(-positives[:, None], -negatives[:, None])  # losses: lower = member
    assert result.tpr_at_1pct_fpr == pytest.approx(3 / 5) and result.fpr_resolution == ""


def test_with_fewer_than_100_non_members_the_tpr_is_at_zero_fpr_and_says_so():
    negatives = np.arange(50.0)
    positives = np.array([49.0, 49.5, 60.0, 10.0])
    result = membership_inference(-positives[:, None], -negatives[:, None])
    assert result.tpr_at_1pct_fpr == pytest.approx(2 / 4)  # only the scores above every non-member
    assert "50 non-members" in result.fpr_resolution


def test_membership_inference_scores_minus_the_mean_loss_and_finds_the_leaking_timestep():
    rng = np.random.default_rng(1)
    members, non_members = rng.normal(1.0, 0.1, size=(40, 3)), rng.normal(1.0, 0.1, size=(60, 3))
    members[:, 2] -= 0.5  # only timestep 2 separates, and members have the lower loss there
    result = membership_inference(members, non_members)
    np.testing.assert_allclose(result.member_scores, -members.mean(axis=1))
    assert result.best_timestep_index == 2 and result.best_timestep_auc == 1.0
    assert abs(result.per_timestep_auc[0] - 0.5) < 0.2 and result.auc > 0.95
    assert result.n_members == 40 and result.n_non_members == 60
    with pytest.raises(ValueError, match="timesteps"):
        membership_inference(members, non_members[:, :2])


# -------------------------------------------------------------------------- the trainer's loss, per sample


def trainer_loss(diffusion, batch, generator) -> torch.Tensor:
    """DiffusionTrainer.loss itself, on the pipeline's core with no condition dropout."""
    trainer = SimpleNamespace(loop=SimpleNamespace(accelerator=SimpleNamespace(device=torch.device("cpu"))),
                              condition_dropout=0.0, text_dropout=0.0, augment=None, diffusion=diffusion)
    with torch.no_grad():
        return DiffusionTrainer.loss(trainer, batch, generator)


def check_equals_trainer_loss(pipeline, latents, prompts, spacing, class_labels=None, conditions=None):
    """The probe's per-sample losses (conditioned from the prompts, or each image's attribute values) average to
    the trainer's batch loss (conditioned from the batch's class indices) under the same draws."""
    diffusion = pipeline.diffusion()
    batch = {"latents": latents, "prompts": prompts, "spacing": spacing}
    if class_labels is not None:
        batch["class_labels"] = class_labels
    expected = trainer_loss(diffusion, batch, torch.Generator().manual_seed(3))
    # The same draws in the trainer's order: dropout coin, noise, timesteps.
    generator = torch.Generator().manual_seed(3)
    torch.rand(len(prompts), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = diffusion.objective.sample_timesteps(len(latents), generator=generator)
    with torch.no_grad():
        condition = diffusion.condition(prompts, conditions=conditions, spacing=spacing)
        per_sample = diffusion.losses(latents, condition, noise, timesteps)
    assert per_sample.shape == (len(latents),) and len(set(per_sample.tolist())) == len(latents)
    torch.testing.assert_close(per_sample.mean(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.slow  # the first test to use the overfitted model trains it (~20 s)
def test_per_sample_loss_is_the_trainers_loss_with_its_prompt_and_class_label(overfitted):
    pipeline, images = overfitted.pipeline, overfitted.train
    latents = pipeline.vae.encode(as_batch(images)[:4])
    # The trainer's class labels are indices made from the records; the probe's come from each image's attribute
    # values (data), or else from the attribute header of its prompt.
    names = list(pipeline.config.class_names)
    labels = torch.tensor([names.index(c["finding"]) + 1 for c in images.conditions[:4]])
    check_equals_trainer_loss(pipeline, latents, images.prompts[:4], torch.ones(4, 2), labels,
                              conditions=images.conditions[:4])
    check_equals_trainer_loss(pipeline, latents, images.prompts[:4], torch.ones(4, 2), labels)


@pytest.mark.parametrize(("spatial_dims", "objective", "scheduler"),
                         [(3, "v_prediction", "ddim"), (2, "rectified_flow", "flow_match_euler"),
                          (2, "epsilon", "dpm_solver")])
def test_per_sample_loss_is_the_trainers_loss_for_every_objective_and_with_spacing(spatial_dims, objective,
                                                                                  scheduler):
    pipeline = make_pipeline(spatial_dims, objective, scheduler)
    latents = torch.randn(pipeline.latent_shape(2))
    spacing = torch.tensor([[1.5] * spatial_dims, [3.0] * spatial_dims])  # per-case spacing reaches the 3D UNet
    check_equals_trainer_loss(pipeline, latents, PROMPTS, spacing)


@pytest.mark.slow
def test_denoising_losses_are_fixed_per_sample_index_and_independent_of_the_batch(overfitted):
    pipeline, images = overfitted.pipeline, overfitted.train
    x, prompts = as_batch(images)[:5], images.prompts[:5]
    losses = denoising_losses(pipeline, x, prompts, timesteps=4, batch_size=16)
    assert losses.shape == (5, 4) and np.isfinite(losses).all() and (losses > 0).all()
    np.testing.assert_allclose(denoising_losses(pipeline, x, prompts, timesteps=4, batch_size=2), losses, rtol=1e-5)
    assert not np.allclose(denoising_losses(pipeline, x, prompts, timesteps=4, noise_seed=1), losses)
    # Given timesteps are training timesteps: the even spread of 4 is their centres 125, 375, 625, 875.
    np.testing.assert_allclose(denoising_losses(pipeline, x, prompts, timesteps=[125, 375, 625, 875]), losses)
    with pytest.raises(ValueError, match="prompts"):
        denoising_losses(pipeline, x, prompts[:4])


def test_denoising_losses_run_in_3d_and_for_rectified_flow():
    for spatial_dims, objective, scheduler in [(3, "v_prediction", "ddim"), (2, "rectified_flow", "flow_match_euler")]:
        pipeline = make_pipeline(spatial_dims, objective, scheduler)
        images = torch.rand(2, 1, *pipeline.config.image_shape) * 2 - 1
        losses = denoising_losses(pipeline, images, PROMPTS, timesteps=3, spacing=(2.0,) * spatial_dims)
        assert losses.shape == (2, 3) and np.isfinite(losses).all()


# ---------------------------------------------------------------------------------------------- near copies


@pytest.mark.slow
def test_autoencoder_round_trip_keeps_the_shape_and_stays_nearest_its_source(overfitted):
    images = as_batch(overfitted.train)
    copies = autoencoder_round_trip(overfitted.pipeline, images, batch_size=4)
    assert copies.shape == images.shape and copies.dtype == torch.float32
    assert float(copies.min()) >= -1.0 and float(copies.max()) <= 1.0
    distances = mean_squared_distances(copies, images)
    assert (distances.argmin(dim=1) == torch.arange(len(images))).all()


@pytest.mark.slow
def test_partial_noise_regeneration_stays_near_its_source_and_drifts_with_strength(overfitted):
    pipeline, train_set = overfitted.pipeline, overfitted.train
    images, prompts = as_batch(train_set), train_set.prompts
    round_trip = autoencoder_round_trip(pipeline, images)
    drift = {}
    for strength in (0.1, 0.3, 0.6, 1.0):
        regenerated = partial_noise_regeneration(pipeline, images, prompts, strength=strength,
                                                 num_inference_steps=20)
        assert regenerated.shape == images.shape and torch.isfinite(regenerated).all()
        distances = mean_squared_distances(regenerated, images)
        if strength == 0.1:  # a light regeneration is a near copy of its own source
            assert (distances.argmin(dim=1) == torch.arange(len(images))).all()
        drift[strength] = float((regenerated - round_trip).pow(2).mean())
    assert drift[0.1] < drift[0.3] < drift[0.6] < drift[1.0], drift
    # Strength 0 redoes nothing: the autoencoder round trip exactly.
    torch.testing.assert_close(partial_noise_regeneration(pipeline, images, prompts, strength=0.0), round_trip)


@pytest.mark.parametrize(("objective", "scheduler"),
                         [("v_prediction", "ddim"), ("v_prediction", "dpm_solver"), ("epsilon", "ddpm"),
                          ("rectified_flow", "flow_match_euler")])
def test_partial_noise_regeneration_is_seeded_per_sample_for_every_scheduler(objective, scheduler):
    pipeline = make_pipeline(2, objective, scheduler)
    images = torch.rand(2, 1, *pipeline.config.image_shape) * 2 - 1
    run = {"strength": 0.5, "num_inference_steps": 6, "guidance_scale": 2.0}
    together = partial_noise_regeneration(pipeline, images, PROMPTS, seed=4, **run)
    one_by_one = partial_noise_regeneration(pipeline, images, PROMPTS, seed=4, batch_size=1, **run)
    torch.testing.assert_close(one_by_one, together, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(partial_noise_regeneration(pipeline, images, PROMPTS, seed=5, **run), together)


def test_full_strength_rectified_flow_regeneration_forgets_the_source():
    # sigma = 1 at strength 1: the noised latent is pure noise, so two sources give one and the same output.
    pipeline = make_pipeline(2, "rectified_flow", "flow_match_euler")
    image = torch.rand(1, 1, *pipeline.config.image_shape) * 2 - 1
    first = partial_noise_regeneration(pipeline, image, PROMPTS[:1], strength=1.0, num_inference_steps=4)
    second = partial_noise_regeneration(pipeline, -image, PROMPTS[:1], strength=1.0, num_inference_steps=4)
    torch.testing.assert_close(first, second)
    half = partial_noise_regeneration(pipeline, -image, PROMPTS[:1], strength=0.5, num_inference_steps=4)
    assert not torch.allclose(first, half)


# ------------------------------------------------------------------------------------ membership inference


@pytest.mark.slow
def test_membership_inference_on_an_overfitted_model_is_well_above_chance(overfitted):
    report = membership_inference_report(overfitted.pipeline, overfitted.train, overfitted.holdout, timesteps=10,
                                         by="finding")
    assert report["n_members"] == report["n_non_members"] == len(overfitted.train)
    assert report["auc"] >= 0.8, report["auc"]
    assert report["mean_member_loss"] < report["mean_non_member_loss"]
    assert report["auc_ci"]["ci_low"] <= report["auc"] <= report["auc_ci"]["ci_high"]
    assert "non-members" in report["fpr_resolution"]  # 9 non-members cannot resolve 1% FPR
    members = {row["id"] for row in report["per_sample"] if row["member"]}
    assert members == set(overfitted.train.ids)
    assert sum(entry["n_members"] for entry in report["by_condition"].values()) <= report["n_members"]


@pytest.mark.slow
def test_membership_inference_on_an_untrained_model_is_about_chance(overfitted, tmp_path):
    # A larger split than the overfitted model's so that chance is measurable: with ~75 members and ~75
    # non-members the null SD of the AUC is sqrt((n + m + 1) / (12 n m)) ~ 0.048, so 0.15 is ~3 SD.
    config = tiny_config(tmp_path, "data.phantom.n_cases=160", "data.split.train=0.5", "data.split.holdout=0.5",
                         "data.split.test=0.0", *OVERFIT[4:])
    ingest(config, progress=False)
    members, non_members = cached_split(config, "train"), cached_split(config, "holdout")
    report = membership_inference_report(random_weights_like(overfitted.pipeline), members, non_members,
                                         n_max=100, timesteps=10)
    assert report["n_members"] == report["n_non_members"] >= 60
    assert abs(report["auc"] - 0.5) <= 0.15, report["auc"]


@pytest.mark.slow
def test_round_trip_copies_are_flagged_at_one_percent_false_positives_and_regenerations_find_their_source(
        overfitted):
    """The near copies a memorising generator emits, against the pixel check calibrated on unseen images.

    Round trips clear the 1%-false-positive threshold. Light regenerations (strength 0.05) land nearest their
    own source but at correlation 0.95-0.98, below what unseen phantoms of other patients reach (0.985); at
    strength 0.1 one in nine may already land on a neighbour, depending on the CPU's rounding in training:
    phantoms of different patients are near-identical, so no threshold at 1% false positives separates them.
    Real images differ between patients: the known answer for regenerations is on real chest X-rays below.
    """
    pipeline, train_set = overfitted.pipeline, overfitted.train
    images = as_batch(train_set)
    holdout = pixel_nearest_neighbours(overfitted.holdout.images, train_set.images)
    threshold = threshold_at_false_positive_rate(holdout.correlation, 0.01)
    assert holdout.flags(threshold).mean() <= 0.01
    round_trips = pixel_nearest_neighbours(autoencoder_round_trip(pipeline, images)[:, 0].numpy(), train_set.images)
    assert round_trips.flags(threshold).mean() >= 0.95, (round_trips.correlation, threshold)
    assert (round_trips.train_index == np.arange(len(train_set))).all()
    regenerated = partial_noise_regeneration(pipeline, images, train_set.prompts, strength=0.05, num_inference_steps=20)
    matches = pixel_nearest_neighbours(regenerated[:, 0].numpy(), train_set.images)
    assert (matches.train_index == np.arange(len(train_set))).all(), (matches.train_index, matches.correlation)


# A memorising model on real chest X-rays (../shared/data): 32 x 32, the same tiny architecture as OVERFIT, half
# of the patients in train and half in holdout so that the false-positive rate rests on ~44 unseen images. A
# regeneration is only as close to its source as the autoencoder's round trip: with 300 autoencoder steps light
# regenerations reached correlation 0.85-0.93 and 9% of them fell below the holdout's best match (0.88); with 800
# steps they reach 0.91-0.94 (strength 0.1), all above it. Measured: strength 0.2 still 93% flagged, 0.3 83%.
CXR_OVERFIT = [*(o for o in OVERFIT if o.startswith(("autoencoder.", "diffusion."))), "autoencoder.max_steps=800",
               "autoencoder.batch_size=8", "autoencoder.norm_num_groups=8", "diffusion.norm_num_groups=8",
               "diffusion.num_head_channels=8", "conditioning.embed_dim=32", "conditioning.condition_dropout=0",
               "conditioning.attributes=[view,sex]", "conditioning.include_text=false",
               "data.preprocess.target_shape=[32,32]", "data.split.train=0.5", "data.split.holdout=0.5",
               "data.split.test=0.0", "data.split.stratify_by=null",
               # the preset's small-data recipe is what this known answer must not have: it wants a memoriser
               "diffusion.augment.probability=0", "diffusion.frontier_every=null"]


@pytest.mark.slow
@pytest.mark.shared_data
def test_near_copies_of_real_chest_xrays_are_flagged_at_one_percent_false_positives(shared_data, tmp_path):
    """Issue 5's near-copy known answer on real images: noise, flip/shift, gamma, autoencoder round trips and
    partial-noise regenerations of the training images are all flagged (recall >= 95%) by the pixel check whose
    threshold lets at most 1% of the unseen holdout through, and each copy is matched to its own source."""
    torch.set_num_threads(2)
    config = load_config("cxr", [f"runtime.output_dir={tmp_path}", f"data.root={shared_data / 'cxr-covid-lungs-256'}",
                                 *CXR_OVERFIT])
    ingest(config, progress=False)
    train(config, progress=False)
    pipeline = load_pipeline(tmp_path / "model", config, progress=False)
    pipeline.set_progress_bar_config(disable=True)
    train_set, holdout_set = cached_split(config, "train"), cached_split(config, "holdout")
    assert len(holdout_set) >= 30

    holdout = pixel_nearest_neighbours(holdout_set.images, train_set.images)
    threshold = threshold_at_false_positive_rate(holdout.correlation, 0.01)
    assert holdout.flags(threshold).mean() <= 0.01
    images = as_batch(train_set)
    copies = {kind: near_copies(train_set.images, kind, seed=1) for kind in NEAR_COPY_KINDS}
    copies["round_trip"] = autoencoder_round_trip(pipeline, images)[:, 0].numpy()
    for strength in (0.05, 0.1):
        copies[f"regeneration_{strength}"] = partial_noise_regeneration(
            pipeline, images, train_set.prompts, strength=strength, num_inference_steps=20)[:, 0].numpy()
    for kind, copy in copies.items():
        matches = pixel_nearest_neighbours(copy, train_set.images)
        assert matches.flags(threshold).mean() >= 0.95, (kind, np.sort(matches.correlation)[:5], threshold)
        assert (matches.train_index == np.arange(len(train_set))).mean() >= 0.95, kind

"""Label maps read by the UNet itself (``conditioning.mask_input: concat``): label shares on the latent grid, map
dropout, pairs without a ControlNet, and a build that trains no ControlNet."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from radsynth.generators.controlnet import one_hot_labels
from radsynth.generators.unet import RadsynthUNet
from radsynth.pipelines.sampling.mask_to_image import RadsynthMaskToImagePipeline
from radsynth.pipelines.sampling.pipeline import CONTROLNET_FOLDER, unet_reads_label_maps
from radsynth.pipelines.sampling.text_to_image import RadsynthTextToImagePipeline

from .test_mask_to_image import label_maps
from .test_sampling_pipeline import PROMPTS, SHAPES, make_pipeline, run

LABELS = 3


def concat_unet(spatial_dims: int) -> RadsynthUNet:
    torch.manual_seed(1)
    unet = RadsynthUNet(spatial_dims=spatial_dims, in_channels=4, out_channels=4, channels=(8, 16),
                        attention_levels=(False, True), num_head_channels=8, cross_attention_dim=16,
                        norm_num_groups=8, use_spacing=spatial_dims == 3, label_channels=LABELS)
    with torch.no_grad():  # MONAI zero-initialises some outputs: randomise them so the inputs reach the output
        for parameter in unet.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.1)
    return unet.eval()


def concat_pipeline(spatial_dims: int) -> RadsynthMaskToImagePipeline:
    base = make_pipeline(spatial_dims)
    return RadsynthMaskToImagePipeline.from_pipe(base, unet=concat_unet(spatial_dims))


def test_label_shares_are_each_labels_share_of_a_latent_voxels_image_voxels():
    unet = concat_unet(2)
    sample = torch.zeros(1, 4, 4, 4)
    labels = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    labels[0, 0, 0:2, 0:2] = 2  # fills latent voxel (0, 0)
    labels[0, 0, 2, 2] = 1  # one of latent voxel (1, 1)'s four image voxels
    shares = unet.label_shares(one_hot_labels(labels, LABELS), sample)
    assert shares.shape == (1, LABELS, 4, 4)
    assert shares[0, 2, 0, 0] == 1 and shares[0, 0, 0, 0] == 0
    assert shares[0, 1, 1, 1] == 0.25 and shares[0, 0, 1, 1] == 0.75
    torch.testing.assert_close(shares.sum(dim=1), torch.ones(1, 4, 4))  # a one-hot map's shares sum to one
    assert not unet.label_shares(None, sample).any()  # no map: zeros, which no map's shares are
    with pytest.raises(ValueError, match="whole multiple of the latent grid"):
        unet.label_shares(one_hot_labels(labels[..., :7], LABELS), sample)
    with pytest.raises(ValueError, match=f"one-hot \\(B=1, {LABELS}"):
        unet.label_shares(one_hot_labels(labels, LABELS + 1), sample)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_the_unets_own_map_steers_the_image_without_a_controlnet(spatial_dims):
    pipeline = concat_pipeline(spatial_dims)
    assert pipeline.mask_controlnet is None
    with_lesion = run(pipeline, label_maps=label_maps(spatial_dims, lesion=2)).images
    background = run(pipeline, label_maps=label_maps(spatial_dims)).images
    assert with_lesion.shape == (len(PROMPTS), 1, *SHAPES[spatial_dims])
    assert np.abs(with_lesion - background).max() > 1e-3
    # Without a map the same UNet is a text-to-image model (its map input zero), which is not any map's image.
    text_only = run(RadsynthTextToImagePipeline.from_pipe(pipeline)).images
    assert np.abs(text_only - background).max() > 1e-3
    # Guidance is over text: both halves keep the map, so a guided image differs and stays finite.
    guided = run(pipeline, label_maps=label_maps(spatial_dims, lesion=2), guidance_scale=4.0).images
    assert np.isfinite(guided).all() and np.abs(guided - with_lesion).max() > 1e-3


def test_map_dropout_zeroes_the_dropped_rows_maps_only():
    diffusion = concat_pipeline(2).diffusion()
    maps = label_maps(2, lesion=2)
    keep_map = torch.tensor([True, False])
    condition = diffusion.condition(PROMPTS, label_maps=maps, keep_map=keep_map)
    torch.testing.assert_close(condition.control[0], one_hot_labels(maps, LABELS)[0])
    assert not condition.control[1].any()
    # The null half of guidance keeps every row's map: the map is the control, not the guided condition.
    assert torch.equal(diffusion.unconditional(condition).control, condition.control)


def test_a_model_folder_whose_unet_reads_maps_loads_as_a_mask_pipeline(tmp_path):
    pipeline = concat_pipeline(2)
    RadsynthTextToImagePipeline.from_pipe(pipeline).save_pretrained(tmp_path / "concat")
    make_pipeline(2).save_pretrained(tmp_path / "plain")
    assert unet_reads_label_maps(tmp_path / "concat") and not unet_reads_label_maps(tmp_path / "plain")
    assert not (tmp_path / "concat" / CONTROLNET_FOLDER).exists()
    loaded = RadsynthMaskToImagePipeline.from_model_dir(tmp_path / "concat")
    loaded.set_progress_bar_config(disable=True)
    maps = label_maps(2, lesion=1)
    np.testing.assert_array_equal(run(loaded, label_maps=maps).images, run(pipeline, label_maps=maps).images)
    # A UNet that reads no map still needs its ControlNet.
    with pytest.raises(FileNotFoundError, match="use_masks"):
        RadsynthMaskToImagePipeline.from_model_dir(tmp_path / "plain")


def test_a_model_without_a_map_input_refuses_maps():
    diffusion = make_pipeline(2).diffusion()
    assert diffusion.map_labels == 0
    with pytest.raises(ValueError, match="ControlNet or a UNet built to read them"):
        diffusion.condition(PROMPTS, label_maps=label_maps(2, lesion=1))


def test_the_membership_probe_gives_a_map_reading_unet_each_cases_own_map():
    from radsynth.pipelines.scoring.generator_probes import denoising_losses

    pipeline = concat_pipeline(2)
    images = torch.rand(len(PROMPTS), 1, *SHAPES[2]) * 2 - 1
    with_maps = denoising_losses(pipeline, images, PROMPTS, timesteps=3, label_maps=label_maps(2, lesion=2)[:, 0].numpy())
    without = denoising_losses(pipeline, images, PROMPTS, timesteps=3)
    assert np.isfinite(with_maps).all() and not np.allclose(with_maps, without)
    # A UNet that reads no map is probed as it was trained, whatever maps the case has.
    plain = make_pipeline(2)
    np.testing.assert_array_equal(
        denoising_losses(plain, images, PROMPTS, timesteps=3, label_maps=label_maps(2, lesion=2)[:, 0].numpy()),
        denoising_losses(plain, images, PROMPTS, timesteps=3))


def test_a_build_with_maps_in_the_unet_trains_no_controlnet_and_samples_pairs(tmp_path):
    from radsynth.pipelines.data.ingest import ingest
    from radsynth.pipelines.sampling.generate import load_pipeline
    from radsynth.pipelines.training import ingested_dataset, train

    from .test_training_stage import tiny_config

    config = tiny_config(tmp_path, "diffusion.max_steps=4", "conditioning.use_masks=true",
                         "conditioning.mask_input=concat", "sampling.pairs=true")
    ingest(config, progress=False)
    result = train(config, progress=False)
    records, _ = ingested_dataset(config)
    unet_config = json.loads((result.model_dir / "unet" / "config.json").read_text())
    assert unet_config["label_channels"] == max(records[0].label_names) + 1
    assert not (result.model_dir / CONTROLNET_FOLDER).exists()
    assert not (tmp_path / "train" / CONTROLNET_FOLDER).exists()
    parts = json.loads((result.model_dir / "compute.json").read_text())["parts"]
    assert set(parts) == {"autoencoder", "diffusion"}
    pipeline = load_pipeline(result.model_dir, config, progress=False)
    assert isinstance(pipeline, RadsynthMaskToImagePipeline)
    maps = torch.zeros(2, 1, *config.data.preprocess.target_shape, dtype=torch.long)
    maps[:, :, 4:10, 4:10] = 1
    images = pipeline(["finding: none.", "finding: none."], maps, num_inference_steps=3,
                      generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 1, *config.data.preprocess.target_shape) and np.isfinite(images).all()
    # The map input is part of what the base learns from: with a ControlNet instead, the base starts over.
    with_controlnet = train(tiny_config(tmp_path, "diffusion.max_steps=4", "conditioning.use_masks=true",
                                        "controlnet.max_steps=2", "controlnet.batch_size=4",
                                        "controlnet.validate_every=null"), progress=False)
    assert with_controlnet.resumed_from == 0 and with_controlnet.model_hash != result.model_hash
    assert (with_controlnet.model_dir / CONTROLNET_FOLDER).is_dir()

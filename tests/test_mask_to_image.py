"""Mask-to-image sampling: a ControlNet's label map steers the text-to-image model; pairs share one grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from radsynth.generators.controlnet import RadsynthControlNet
from radsynth.pipelines.sampling.mask_to_image import RadsynthMaskToImagePipeline
from radsynth.pipelines.sampling.pipeline import CONTROLNET_FOLDER

from .test_controlnet import as_if_trained_controlnet
from .test_sampling_pipeline import PROMPTS, SHAPES, make_pipeline, run


def mask_pipeline(spatial_dims: int, trained: bool = True) -> RadsynthMaskToImagePipeline:
    base = make_pipeline(spatial_dims)
    controlnet = RadsynthControlNet.from_unet(base.unet, num_labels=3, downsample_factor=base.vae.downsample_factor)
    if trained:
        controlnet = as_if_trained_controlnet(controlnet)
    return RadsynthMaskToImagePipeline.from_pipe(base, mask_controlnet=controlnet.eval())


def label_maps(spatial_dims: int, fill: int = 0, lesion: int | None = None) -> torch.Tensor:
    maps = torch.full((len(PROMPTS), 1, *SHAPES[spatial_dims]), fill, dtype=torch.long)
    if lesion is not None:
        maps[(slice(None), 0, *(slice(2, 6),) * spatial_dims)] = lesion
    return maps


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_a_new_controlnet_samples_the_text_to_image_models_images(spatial_dims):
    pipeline = mask_pipeline(spatial_dims, trained=False)
    base = make_pipeline(spatial_dims)
    images = run(pipeline, label_maps=label_maps(spatial_dims, lesion=2)).images
    assert images.shape == (len(PROMPTS), 1, *SHAPES[spatial_dims])  # the label map's grid
    np.testing.assert_array_equal(images, run(base).images)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_the_label_map_steers_the_image_in_proportion_to_the_scale(spatial_dims):
    pipeline = mask_pipeline(spatial_dims)
    with_lesion = run(pipeline, label_maps=label_maps(spatial_dims, lesion=2)).images
    without = run(pipeline, label_maps=label_maps(spatial_dims)).images
    assert np.abs(with_lesion - without).max() > 1e-3
    unsteered = run(pipeline, label_maps=label_maps(spatial_dims, lesion=2), conditioning_scale=0.0).images
    np.testing.assert_array_equal(unsteered, run(make_pipeline(spatial_dims)).images)
    # Guidance over text still works with the map on: a higher scale changes the image.
    guided = run(pipeline, label_maps=label_maps(spatial_dims, lesion=2), guidance_scale=4.0).images
    assert np.abs(guided - with_lesion).max() > 1e-3


def test_a_model_folder_with_its_controlnet_loads_as_a_mask_pipeline(tmp_path):
    pipeline = mask_pipeline(2)
    pipeline_base = make_pipeline(2)
    pipeline_base.save_pretrained(tmp_path)
    pipeline.mask_controlnet.save_pretrained(tmp_path / CONTROLNET_FOLDER)
    loaded = RadsynthMaskToImagePipeline.from_model_dir(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.image_shape == pipeline.config.image_shape and loaded.config.modality == "ct"
    maps = label_maps(2, lesion=1)
    np.testing.assert_array_equal(run(loaded, label_maps=maps).images, run(pipeline, label_maps=maps).images)
    with pytest.raises(FileNotFoundError, match="use_masks"):
        RadsynthMaskToImagePipeline.from_model_dir(tmp_path / "elsewhere")


def test_label_maps_off_the_image_grid_or_outside_the_vocabulary_are_refused():
    pipeline = mask_pipeline(2)
    with pytest.raises(ValueError, match="label_maps must have shape"):
        run(pipeline, label_maps=torch.zeros(len(PROMPTS), 1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="0..2"):
        run(pipeline, label_maps=label_maps(2, lesion=5))

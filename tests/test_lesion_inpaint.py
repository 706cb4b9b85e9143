"""Lesion inpainting: new content only inside the lesion region of a real image, the rest kept value for value."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from radsynth.pipelines.sampling.lesion_inpaint import RadsynthLesionInpaintPipeline

from .test_mask_to_image import label_maps, mask_pipeline
from .test_sampling_pipeline import PROMPTS, SHAPES


def inpaint_pipeline(spatial_dims: int) -> RadsynthLesionInpaintPipeline:
    base = mask_pipeline(spatial_dims)
    pipeline = RadsynthLesionInpaintPipeline.from_pipe(base)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def backgrounds(spatial_dims: int) -> torch.Tensor:
    """Smooth "real" images in [-1, 1] that the tiny autoencoder cannot reproduce exactly."""
    grid = torch.meshgrid(*(torch.linspace(-1, 1, n) for n in SHAPES[spatial_dims]), indexing="ij")
    image = 0.6 * torch.sin(3 * grid[0]) * torch.cos(2 * grid[-1])
    return torch.stack([image, -image])[:, None]


def lesion_regions(spatial_dims: int) -> torch.Tensor:
    return label_maps(spatial_dims, lesion=2) == 2  # a 4-voxel cube at 2..5 on every axis


def generators(seed: int = 0, n: int = len(PROMPTS)) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_only_the_lesion_region_changes_and_the_rest_is_the_real_image(spatial_dims):
    pipeline, real, regions = inpaint_pipeline(spatial_dims), backgrounds(spatial_dims), lesion_regions(spatial_dims)
    output = pipeline(PROMPTS, real, label_maps(spatial_dims, lesion=2), regions, margin=1, num_inference_steps=3,
                      generator=generators(), output_type="pt")
    grown = pipeline.inpaint_region(regions, 1)
    assert int(grown.sum()) > int(regions.sum())  # the rim
    torch.testing.assert_close(output.images[~grown], real[~grown], rtol=0, atol=0)
    assert (output.images[regions] - real[regions]).abs().mean() > 0.05  # new content inside
    # What the decoder alone would give outside the region is not the real image: the paste is what keeps it.
    round_trip = pipeline.vae.decode(pipeline.vae.encode(real)).clamp(-1, 1)
    assert (round_trip[~grown] - real[~grown]).abs().max() > 1e-3


def test_the_generated_region_fits_the_background_and_each_image_reproduces_alone():
    pipeline, real, regions = inpaint_pipeline(2), backgrounds(2), lesion_regions(2)
    maps = label_maps(2, lesion=2)
    output = pipeline(PROMPTS, real, maps, regions, num_inference_steps=3, generator=generators())
    alone = pipeline(PROMPTS[1:], real[1:], maps[1:], regions[1:], num_inference_steps=3, generator=generators()[1:])
    np.testing.assert_allclose(alone.images[0], output.images[1], atol=1e-5)
    # Latent blending: the region is drawn next to the real image's latents, so another background changes it.
    other = pipeline(PROMPTS, -real, maps, regions, num_inference_steps=3, generator=generators())
    assert np.abs(other.images[:, 0][regions[:, 0].numpy()] - output.images[:, 0][regions[:, 0].numpy()]).max() > 1e-3
    physical = pipeline(PROMPTS, real, maps, regions, num_inference_steps=3, generator=generators(),
                        output_type="physical").images
    np.testing.assert_allclose(physical, pipeline.to_physical(output.images), rtol=1e-5, atol=1e-3)


def test_images_or_regions_off_the_grid_are_refused():
    pipeline = inpaint_pipeline(2)
    with pytest.raises(ValueError, match="images and regions must have shape"):
        pipeline(PROMPTS, torch.zeros(2, 1, 8, 8), label_maps(2), lesion_regions(2))

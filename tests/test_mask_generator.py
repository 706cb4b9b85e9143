"""The mask generator and the text-to-pair pipeline: label maps from text, then the image on the same grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from radsynth.generators.latent_diffusion import LatentDiffusion
from radsynth.generators.mask_generator import MAX_LABEL_WEIGHT, LabelLossWeights, RadsynthMaskGenerator
from radsynth.pipelines.masks import RAS_VOLUME_ORIENTATION, default_orientation
from radsynth.pipelines.sampling.pipeline import MASK_GENERATOR_FOLDER
from radsynth.pipelines.sampling.text_to_pair import RadsynthTextToPairPipeline
from radsynth.pipelines.scoring.segmenter import per_label_dice

from .test_mask_bank import phantom_case
from .test_mask_to_image import mask_pipeline
from .test_sampling_pipeline import PROMPTS, SHAPES

VOCABULARY = {"0": "background", "1": "lung", "2": "nodule"}


def tiny_generator(spatial_dims: int, image_shape=None, **config) -> RadsynthMaskGenerator:
    torch.manual_seed(0)
    return RadsynthMaskGenerator(
        label_names=config.pop("label_names", VOCABULARY), image_shape=image_shape or SHAPES[spatial_dims],
        spatial_dims=spatial_dims, channels=(8, 16), attention_levels=(False, True), num_head_channels=8,
        cross_attention_dim=16, norm_num_groups=8, **config).eval()


def pair_pipeline(spatial_dims: int) -> RadsynthTextToPairPipeline:
    """The tiny text-to-image model (16-dim text) with a trained-like ControlNet and a random mask generator whose
    output is biased towards "lung", so generated maps hold lung for the lesion requests to grow in."""
    base = mask_pipeline(spatial_dims)
    generator = tiny_generator(spatial_dims)
    with torch.no_grad():
        generator.denoiser.net.out[-1].conv.bias.copy_(torch.tensor([1.0, -1.0, 1.0]))  # v = -x0 at t=T
    pipeline = RadsynthTextToPairPipeline.from_pipe(base, mask_generator=generator)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def generators(seed: int = 0, n: int = len(PROMPTS)) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


@pytest.mark.parametrize("kind", ["chest_xray", "ct_torso"])
def test_label_shares_coarsened_then_upsampled_keep_every_label_and_the_organs_shapes(kind):
    case = phantom_case(kind)
    names = {str(value): name for value, name in case.label_names.items()}
    generator = tiny_generator(case.label.ndim, image_shape=case.label.shape, label_names=names, downsample=2)
    maps = torch.as_tensor(case.label[None, None].astype(np.int64))
    shares = generator.encode(maps)
    assert shares.shape == (1, generator.num_labels, *(size // 2 for size in case.label.shape))
    assert float(shares.min()) >= -1.0 and float(shares.max()) <= 1.0
    np.testing.assert_allclose(((shares + 1) / 2).sum(1).numpy(), 1.0, atol=1e-5)  # shares of a voxel sum to 1
    decoded = generator.decode(shares)
    assert decoded.shape == maps.shape and decoded.dtype == torch.int64
    labels = [int(value) for value in np.unique(case.label) if value != 0]
    dice = dict(zip(labels, per_label_dice(decoded[:, 0].numpy(), case.label[None], labels)[0]))
    organs = [label for label in labels if (case.label == label).sum() >= 1000]
    assert organs and min(dice[label] for label in organs) >= 0.95, dice
    # Structures of 70-500 voxels (kidneys, spleen, vertebrae at 48^3) survive, coarser.
    assert min(dice.values()) >= 0.5, dice
    # At full resolution without smoothing the representation is lossless.
    exact = tiny_generator(case.label.ndim, image_shape=case.label.shape, label_names=names, downsample=1)
    torch.testing.assert_close(exact.decode(exact.encode(maps)), maps)


def test_label_loss_weights_favour_rare_labels_per_label_and_where_they_lie():
    # 100 maps of 10x10: an organ of 9 pixels in each, a 1-pixel finding in half -> mean shares 0.905, 0.09, 0.005.
    maps = torch.zeros(100, 1, 10, 10, dtype=torch.long)
    maps[:, :, 1:4, 1:4] = 1
    maps[:50, :, 9, 9] = 2
    shares = tiny_generator(2, image_shape=(10, 10), downsample=1).encode(maps)
    weights = LabelLossWeights.from_shares(shares, balance=0.5, rare_weight=3.0)
    torch.testing.assert_close(weights.per_label, torch.tensor([1.0, (0.905 / 0.09) ** 0.5, (0.905 / 0.005) ** 0.5]))
    assert weights.rare.tolist() == [False, False, True]
    # Known answers per voxel: per-label weight x (1 + 3 x the rare share there).
    batch = weights(shares[:2])
    torch.testing.assert_close(batch[0, :, 0, 0], weights.per_label)
    torch.testing.assert_close(batch[0, :, 9, 9], weights.per_label * 4.0)
    # The cap, and "off" is the plain squared error.
    assert LabelLossWeights.from_shares(shares, balance=1.0, rare_weight=0.0).per_label.max() == MAX_LABEL_WEIGHT
    torch.testing.assert_close(LabelLossWeights.from_shares(shares, 0.0, 0.0)(shares), torch.ones_like(shares))


def test_the_mask_generators_loss_is_weighted_by_its_label_weights():
    generator, pipeline = tiny_generator(2), pair_pipeline(2)
    clean = generator.encode(torch.randint(0, 3, (2, 1, *SHAPES[2])))
    weights = LabelLossWeights.from_shares(clean, balance=0.5, rare_weight=3.0)

    def losses(loss_weights):
        diffusion = LatentDiffusion(generator, generator, pipeline.text_encoder, pipeline.objective,
                                    loss_weights=loss_weights)
        torch.manual_seed(1)
        noise = torch.randn_like(clean)
        return diffusion.losses(clean, diffusion.condition(PROMPTS[:2]), noise, torch.tensor([300, 700]))

    plain, doubled = losses(None), losses(lambda batch, condition: torch.full_like(batch, 2.0))
    torch.testing.assert_close(doubled, 2 * plain)
    assert not torch.allclose(losses(weights), plain)


def test_a_saved_mask_generator_loads_with_its_vocabulary_orientation_and_weights(tmp_path):
    generator = tiny_generator(3, orientation={"lr_axis": 0, "cc_axis": 2, "right_is_low_index": True,
                                               "superior_is_low_index": False})
    generator.save_pretrained(tmp_path, safe_serialization=True)
    loaded = RadsynthMaskGenerator.from_pretrained(tmp_path, use_safetensors=True, low_cpu_mem_usage=False).eval()
    assert loaded.label_vocabulary == {0: "background", 1: "lung", 2: "nodule"} and loaded.grid_shape == (4, 4, 4)
    sample, context = torch.randn(2, 3, 4, 4, 4), torch.randn(2, 5, 16)
    torch.testing.assert_close(loaded(sample, 10, context), generator(sample, 10, context), rtol=0, atol=0)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_pairs_from_text_share_one_grid_and_each_pair_reproduces_alone(spatial_dims):
    pipeline = pair_pipeline(spatial_dims)
    output = pipeline(PROMPTS, num_inference_steps=3, generator=generators())
    shape = (len(PROMPTS), 1, *SHAPES[spatial_dims])
    assert output.images.shape == shape and output.label_maps.shape == shape
    assert output.label_maps.dtype == np.int64 and set(np.unique(output.label_maps)) <= {0, 1, 2}
    assert (output.label_maps == 1).mean() > 0.5 and output.mask_sources == ["generated"] * len(PROMPTS)
    alone = pipeline(PROMPTS[1:], num_inference_steps=3, generator=generators()[1:])
    np.testing.assert_array_equal(alone.label_maps[0], output.label_maps[1])
    np.testing.assert_allclose(alone.images[0], output.images[1], atol=1e-5)
    # The map steers the image: the same noise under another map gives another image.
    other = pipeline(PROMPTS, label_maps=np.zeros(shape, dtype=np.int64), num_inference_steps=3,
                     generator=generators())
    assert other.mask_sources == ["user"] * len(PROMPTS) and not np.array_equal(other.label_maps, output.label_maps)
    assert np.abs(other.images - output.images).max() > 1e-3


def test_the_mask_generators_guidance_is_its_own_and_defaults_to_the_images(monkeypatch):
    pipeline, used = pair_pipeline(2), []
    sample = LatentDiffusion.sample

    def spy(self, *args, guidance_scale=1.0, **kwargs):
        used.append((type(self.denoiser).__name__, guidance_scale))
        return sample(self, *args, guidance_scale=guidance_scale, **kwargs)

    monkeypatch.setattr(LatentDiffusion, "sample", spy)
    default = pipeline(PROMPTS, num_inference_steps=3, guidance_scale=3.0, generator=generators())
    unguided = pipeline(PROMPTS, num_inference_steps=3, guidance_scale=3.0, mask_guidance_scale=1.0,
                        generator=generators())
    assert used == [("RadsynthMaskGenerator", 3.0), ("RadsynthUNet", 3.0),
                    ("RadsynthMaskGenerator", 1.0), ("RadsynthUNet", 3.0)]
    # (This tiny generator draws the same all-lung map either way, so the images agree: the image's sampling is
    # untouched by the maps' guidance.)
    np.testing.assert_array_equal(unguided.label_maps, default.label_maps)
    np.testing.assert_allclose(unguided.images, default.images, atol=1e-5)


def test_lesion_requests_edit_generated_maps_before_the_image_is_drawn():
    pipeline = pair_pipeline(2)  # 16 x 16 pixels of 1.5 mm
    output = pipeline(PROMPTS, lesions=["nodule 20 mm2"], num_inference_steps=3, generator=generators())
    for label_map, edits in zip(output.label_maps, output.lesions):
        (edit,) = edits
        assert edit["action"] == "insert" and edit["lesion_label"] == "nodule"
        assert (label_map == 2).sum() == edit["voxel_count"] and abs(edit["achieved_volume"] - 20) <= 1.5**2  # one pixel
        assert label_map[(0, *edit["centre_voxel"])] == 2
    unedited = pipeline(PROMPTS, num_inference_steps=3, generator=generators())
    assert np.abs(unedited.images - output.images).max() > 1e-3  # the image follows the edited map


def test_orientation_comes_from_the_generator_or_the_phantom_layout():
    assert pair_pipeline(2).orientation == default_orientation(2)
    base = mask_pipeline(3)
    generator = tiny_generator(3, orientation={"lr_axis": 0, "cc_axis": 2, "right_is_low_index": False,
                                               "superior_is_low_index": False})
    assert RadsynthTextToPairPipeline.from_pipe(base, mask_generator=generator).orientation == \
        RAS_VOLUME_ORIENTATION


def test_a_model_folder_with_both_mask_models_loads_as_a_pair_pipeline(tmp_path):
    pipeline = pair_pipeline(2)
    from radsynth.pipelines.sampling.pipeline import CONTROLNET_FOLDER

    from .test_sampling_pipeline import make_pipeline

    make_pipeline(2).save_pretrained(tmp_path)
    pipeline.mask_controlnet.save_pretrained(tmp_path / CONTROLNET_FOLDER)
    with pytest.raises(FileNotFoundError, match="mask_generator.enabled"):
        RadsynthTextToPairPipeline.from_model_dir(tmp_path)
    pipeline.mask_generator.save_pretrained(tmp_path / MASK_GENERATOR_FOLDER)
    loaded = RadsynthTextToPairPipeline.from_model_dir(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    first = loaded(PROMPTS, num_inference_steps=3, generator=generators())
    second = pipeline(PROMPTS, num_inference_steps=3, generator=generators())
    np.testing.assert_array_equal(first.label_maps, second.label_maps)
    np.testing.assert_allclose(first.images, second.images, atol=1e-6)


def test_a_mask_generator_for_another_grid_is_refused():
    base = mask_pipeline(2)
    with pytest.raises(ValueError, match="mask generator draws maps of"):
        RadsynthTextToPairPipeline.from_pipe(base, mask_generator=tiny_generator(2, image_shape=(32, 32)))

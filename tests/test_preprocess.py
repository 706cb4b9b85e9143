import numpy as np
import pytest

from radsynth.configs.schema import IntensityConfig, PreprocessConfig
from radsynth.pipelines.data.io import Image
from radsynth.pipelines.data.preprocess import (
    crop_or_pad,
    fit_intensity_map,
    preprocess_case,
    resample,
    restore_geometry,
    to_ras,
)


def world_of_brightest(image: Image) -> np.ndarray:
    index = np.unravel_index(np.argmax(image.array), image.array.shape)
    return (image.affine @ np.array([*index, 1.0]))[:-1]


def marked_volume(shape=(20, 24, 16), mark=(5, 17, 9), affine=None) -> Image:
    array = np.zeros(shape, np.float32)
    array[mark] = 1000.0
    return Image(array, np.diag([1.0, 1.0, 1.0, 1.0]) if affine is None else affine)


def test_to_ras_flips_and_permutes_axes_but_keeps_world_positions():
    # LPS-like voxel axes, permuted: axis 0 runs posterior, axis 1 runs to the right, axis 2 up.
    affine = np.array([[0, -0.8, 0, 10], [-0.8, 0, 0, 20], [0, 0, 2.5, -30], [0, 0, 0, 1]], float)
    image = marked_volume(affine=affine)
    canonical = to_ras(image)
    assert np.all(np.diag(canonical.affine)[:3] > 0) and np.allclose(canonical.affine[:3, :3], np.diag([0.8, 0.8, 2.5]))
    assert canonical.array.shape == (24, 20, 16)
    np.testing.assert_allclose(world_of_brightest(canonical), world_of_brightest(image))


@pytest.mark.parametrize("scale", [(2.0, 2.0, 2.0), (0.5, 0.5, 1.0), (1.0, 3.0, 0.5)])
def test_resample_keeps_the_field_of_view_and_moves_voxel_centres_correctly(scale):
    image = Image(np.random.default_rng(0).random((24, 24, 24)).astype(np.float32), np.diag([1.2, 0.7, 2.0, 1]))
    shape = tuple(int(24 // s) for s in scale)
    out = resample(image, np.array(scale), None, order=1)
    assert out.array.shape == shape
    np.testing.assert_allclose(out.spacing, np.array([1.2, 0.7, 2.0]) * np.array(scale))
    # The outer voxel edges (corners of the field of view) land at the same world position.
    corner_in = image.affine @ np.array([-0.5, -0.5, -0.5, 1])
    corner_out = out.affine @ np.array([-0.5, -0.5, -0.5, 1])
    np.testing.assert_allclose(corner_out, corner_in, atol=1e-9)


def test_resampled_label_keeps_a_blob_in_the_same_world_place():
    label = np.zeros((40, 40), np.uint8)
    label[10:16, 24:30] = 3
    image = Image(label, np.diag([0.5, 0.5, 1]))
    out = resample(image, np.array([2.0, 2.0]), (20, 20), order=0)
    assert set(np.unique(out.array)) == {0, 3}
    centre_in = image.affine @ np.array([*np.argwhere(label == 3).mean(0), 1])
    centre_out = out.affine @ np.array([*np.argwhere(out.array == 3).mean(0), 1])
    np.testing.assert_allclose(centre_out, centre_in, atol=0.5)  # within one output pixel (1 mm)


def test_crop_and_pad_shift_the_origin_with_the_content():
    image = marked_volume()
    for shape in [(10, 30, 16), (26, 12, 8)]:
        out = crop_or_pad(image, shape, fill=-5.0)
        assert out.array.shape == shape
        if out.array.max() == 1000.0:
            np.testing.assert_allclose(world_of_brightest(out), world_of_brightest(image))
        assert (out.array == -5.0).any() == any(n > o for n, o in zip(shape, image.array.shape))


def test_ct_window_maps_hu_to_minus_one_one_and_the_inverse_brings_hu_back():
    hu = np.array([-1000.0, -200.0, 0.0, 40.0, 700.0, 1000.0], np.float32)
    mapping = fit_intensity_map(hu, "ct", IntensityConfig())
    scaled = mapping.forward(hu)
    np.testing.assert_allclose(scaled, [-1, -0.2, 0, 0.04, 0.7, 1], atol=1e-6)
    np.testing.assert_allclose(mapping.inverse(scaled), hu, atol=1e-3)
    assert mapping.forward(np.array([3000.0]))[0] == 1.0  # outside the window: clipped


def test_mri_percentiles_ignore_zero_background():
    rng = np.random.default_rng(1)
    volume = np.zeros((30, 30, 30), np.float32)
    volume[5:25, 5:25, 5:25] = rng.uniform(100, 200, (20, 20, 20))
    mapping = fit_intensity_map(volume, "mri", IntensityConfig(percentiles=(0, 100)))
    assert 100 <= mapping.low < 101 and 199 < mapping.high <= 200


def test_preprocess_case_then_restore_geometry_recovers_the_original_within_interpolation_error():
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in (30, 34, 22)], indexing="ij")
    smooth = (500 * np.exp(-(x**2 + y**2 + z**2) * 2) - 200).astype(np.float32)
    label = ((x**2 + y**2 + z**2) < 0.3).astype(np.uint8)
    affine = np.diag([-0.9, 0.8, 1.4, 1.0])  # x axis flipped: to_ras must reorder it
    config = PreprocessConfig(target_shape=[32, 32, 32], target_spacing=[1.2, 1.2, 1.2])
    case = preprocess_case(Image(smooth, affine), Image(label, affine), "ct", config)
    assert case.image.shape == (1, 32, 32, 32) and case.label.shape == (1, 32, 32, 32)
    assert case.image.min() >= -1 and case.image.max() <= 1
    physical = case.intensity.inverse(case.image[0])
    back = restore_geometry(physical, case.affine, case.original_affine, case.original_shape, order=1)
    inner = (slice(3, -3),) * 3  # edges see padding and interpolation from outside the field of view
    assert np.abs(back[inner] - smooth[inner]).mean() < 8.0  # HU, from a 700 HU dynamic range
    back_label = restore_geometry(case.label[0], case.affine, case.original_affine, case.original_shape, order=0)
    dice = 2 * ((back_label == 1) & (label == 1)).sum() / ((back_label == 1).sum() + (label == 1).sum())
    assert dice > 0.9


def test_resize_mode_reaches_the_target_shape_for_2d():
    image = Image(np.random.default_rng(3).random((256, 200)).astype(np.float32), np.diag([1.0, 1.0, 1.0]))
    case = preprocess_case(image, None, "xray", PreprocessConfig(target_shape=[64, 64]))
    assert case.image.shape == (1, 64, 64) and case.label is None
    np.testing.assert_allclose(np.linalg.norm(case.affine[:2, :2], axis=0), [4.0, 3.125])


def test_a_label_too_small_for_the_target_grid_is_reported_as_lost():
    label = np.zeros((64, 64), np.uint8)
    label[10:40, 10:40] = 1
    label[49, 49] = 2  # one pixel off the 4k+2 sampling grid: gone at a quarter of the resolution
    image = Image(np.random.default_rng(4).random((64, 64)).astype(np.float32), np.eye(3))
    case = preprocess_case(image, Image(label, np.eye(3)), "xray", PreprocessConfig(target_shape=[16, 16]))
    assert case.lost_labels == (2,)
    kept = preprocess_case(image, Image(label, np.eye(3)), "xray", PreprocessConfig(target_shape=[64, 64]))
    assert kept.lost_labels == ()

"""Feature spaces for scoring: known answers for the radiomics vector, behaviour of the random CNN and of the
self-supervised encoder (determinism, batch independence, shapes, learning, persistence)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import ndimage, stats

from radsynth.pipelines.scoring.features import (
    FeatureExtractor,
    RadiomicsFeatures,
    RandomCNNFeatures,
    SelfSupervisedEncoder,
    augment,
    nt_xent_loss,
)
from radsynth.pipelines.scoring.features.first_order import FIRST_ORDER_NAMES
from radsynth.pipelines.scoring.features.glcm import GLCM_NAMES, neighbour_offsets

torch.set_num_threads(1)

BINS = 32
REGION_NAMES = [f"firstorder_{n}" for n in FIRST_ORDER_NAMES] + [f"glcm_{n}" for n in GLCM_NAMES]


def random_images(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Smoothed noise on [-1, 1]: structure at several scales, not constant."""
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.normal(size=shape), sigma=(0,) + (1.5,) * (len(shape) - 1))
    return np.clip(smooth / (3 * smooth.std()), -1, 1).astype(np.float32)


def blob_images(n: int, size: int, seed: int) -> np.ndarray:
    """Distinct phantom-like images: 2-4 gaussian blobs of random position, size and brightness on -1."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, size)] * 2, indexing="ij"))
    images = np.full((n, size, size), -1.0)
    for image in images:
        for _ in range(rng.integers(2, 5)):
            centre, radius = rng.uniform(-0.6, 0.6, (2, 1, 1)), rng.uniform(0.1, 0.35)
            image += rng.uniform(0.5, 1.5) * np.exp(-((grid - centre) ** 2).sum(0) / (2 * radius ** 2))
    return np.clip(images, -1, 1).astype(np.float32)


def named(extractor: RadiomicsFeatures, row: np.ndarray) -> dict[str, float]:
    return dict(zip(extractor.feature_names, row))


# ------------------------------------------------------------------------------------------------ F0


def test_random_cnn_is_seeded_and_leaves_the_global_rng_alone():
    images = random_images((4, 32, 32))
    state = torch.random.get_rng_state()
    first = RandomCNNFeatures(2, seed=3).extract(images)
    assert torch.equal(state, torch.random.get_rng_state())
    np.testing.assert_array_equal(first, RandomCNNFeatures(2, seed=3).extract(images))
    assert not np.allclose(first, RandomCNNFeatures(2, seed=4).extract(images))


@pytest.mark.parametrize("spatial_dims, shape", [(2, (7, 32, 32)), (3, (5, 16, 16, 16))])
def test_random_cnn_shapes_and_batch_independence(spatial_dims, shape):
    images = random_images(shape)
    extractor = RandomCNNFeatures(spatial_dims, channels=(8, 16, 32))
    features = extractor.extract(images, batch_size=64)
    assert features.shape == (shape[0], 2 * (8 + 16 + 32)) and features.dtype == np.float64
    assert np.isfinite(features).all() and features.std(0).max() > 0
    np.testing.assert_allclose(extractor.extract(images, batch_size=3), features, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(extractor.extract(images[2:4]), features[2:4], rtol=1e-5, atol=1e-6)


def test_every_feature_space_meets_the_protocol():
    for extractor in (RandomCNNFeatures(2), RadiomicsFeatures(2), SelfSupervisedEncoder(2)):
        assert isinstance(extractor, FeatureExtractor)
    assert {RandomCNNFeatures.name, RadiomicsFeatures.name, SelfSupervisedEncoder.name} == {
        "random_cnn", "radiomics", "self_supervised"}


# ------------------------------------------------------------------------------------------------ F1


def test_constant_image_has_zero_spread_texture_and_detail():
    extractor = RadiomicsFeatures(2)
    values = named(extractor, extractor.extract(np.full((1, 24, 24), 0.3, np.float32))[0])
    for key in ("sd", "skewness", "kurtosis", "iqr", "entropy"):
        assert values[f"firstorder_{key}"] == 0.0, key
    assert values["firstorder_mean"] == pytest.approx(0.3) and values["firstorder_p90"] == pytest.approx(0.3)
    assert values["glcm_contrast"] == 0.0 and values["glcm_dissimilarity"] == 0.0
    assert values["glcm_homogeneity"] == 1.0 and values["glcm_asm"] == 1.0 and values["glcm_entropy"] == 0.0
    assert all(abs(values[f"log_sigma{s:g}_energy"]) < 1e-10 for s in extractor.log_sigmas)
    assert values["wavelet_LL_energy"] == pytest.approx(0.09, rel=1e-6)
    assert values["wavelet_LH_energy"] == values["wavelet_HL_energy"] == values["wavelet_HH_energy"] == 0.0


def test_checkerboard_has_maximal_contrast_and_lower_homogeneity_than_a_ramp():
    rows, cols = np.indices((32, 32))
    checker = np.where((rows + cols) % 2 == 0, 1.0, -1.0)
    ramp = np.tile(np.linspace(-1, 1, 32), (32, 1))
    noise = np.random.default_rng(0).uniform(-1, 1, (32, 32))
    extractor = RadiomicsFeatures(2, bins=BINS)
    checker_f, ramp_f, noise_f = (named(extractor, row) for row in
                                  extractor.extract(np.stack([checker, ramp, noise]).astype(np.float32)))
    # Horizontal and vertical neighbours are always the two extreme levels, diagonal ones equal: 2 of 4.
    assert checker_f["glcm_contrast"] == pytest.approx((BINS - 1) ** 2 / 2)
    assert checker_f["glcm_dissimilarity"] == pytest.approx((BINS - 1) / 2)
    # Uniform noise over all levels has contrast 2 var(level) = (BINS**2 - 1) / 6, a third of the checkerboard's.
    assert noise_f["glcm_contrast"] == pytest.approx((BINS ** 2 - 1) / 6, rel=0.1)
    assert checker_f["glcm_contrast"] > 2.5 * noise_f["glcm_contrast"] > 100 * ramp_f["glcm_contrast"] > 0
    assert checker_f["glcm_homogeneity"] < ramp_f["glcm_homogeneity"]
    # Correlation is -1 along the axes and +1 along the diagonals; a ramp's neighbours are nearly equal.
    assert checker_f["glcm_correlation"] == pytest.approx(0.0, abs=1e-12) and ramp_f["glcm_correlation"] > 0.9
    # The checkerboard is pure diagonal detail: all its wavelet energy is in HH.
    assert checker_f["wavelet_HH_energy"] == pytest.approx(1.0) and checker_f["wavelet_LL_energy"] < 1e-12


def test_3d_checkerboard_contrast_counts_the_13_directions():
    assert len(neighbour_offsets(2)) == 4 and len(neighbour_offsets(3)) == 13
    parity = np.indices((12, 12, 12)).sum(0) % 2
    volume = np.where(parity == 0, 1.0, -1.0).astype(np.float32)[None]
    extractor = RadiomicsFeatures(3, bins=BINS)
    values = named(extractor, extractor.extract(volume)[0])
    # Neighbours differ along the 3 axis and 4 body-diagonal directions (odd number of unit steps), 7 of 13.
    assert values["glcm_contrast"] == pytest.approx(7 / 13 * (BINS - 1) ** 2)
    assert len(extractor.feature_names) == extractor.extract(volume).shape[1]
    assert sum(name.startswith("wavelet_") for name in extractor.feature_names) == 8


def test_first_order_statistics_match_numpy_and_scipy():
    image = random_images((1, 40, 36), seed=5)
    extractor = RadiomicsFeatures(2, bins=BINS)
    values = named(extractor, extractor.extract(image)[0])
    pixels = image.ravel().astype(np.float64)
    expected = {"mean": pixels.mean(), "sd": pixels.std(), "skewness": stats.skew(pixels),
                "kurtosis": stats.kurtosis(pixels), "min": pixels.min(), "max": pixels.max(),
                "energy": (pixels ** 2).mean(),
                "iqr": np.percentile(pixels, 75) - np.percentile(pixels, 25)}
    expected |= {f"p{q}": np.percentile(pixels, q) for q in (10, 25, 50, 75, 90)}
    histogram = np.histogram(pixels, bins=BINS, range=(-1, 1))[0] / pixels.size
    expected["entropy"] = stats.entropy(histogram, base=2)
    for key, value in expected.items():
        assert values[f"firstorder_{key}"] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def reference_glcm_features(image: np.ndarray, bins: int) -> np.ndarray:
    """Slow, loop-based GLCM (symmetric, distance 1, features averaged over the 4 directions)."""
    levels = np.clip(np.floor((image.astype(np.float64) + 1) * bins / 2), 0, bins - 1).astype(int)
    per_direction = []
    for dr, dc in [(0, 1), (1, -1), (1, 0), (1, 1)]:
        matrix = np.zeros((bins, bins))
        for r, c in itertools.product(range(image.shape[0]), range(image.shape[1])):
            if 0 <= r + dr < image.shape[0] and 0 <= c + dc < image.shape[1]:
                matrix[levels[r, c], levels[r + dr, c + dc]] += 1
                matrix[levels[r + dr, c + dc], levels[r, c]] += 1
        p = matrix / matrix.sum()
        i, j = np.indices(p.shape)
        mu = (p * i).sum()
        sigma2 = (p * (i - mu) ** 2).sum()
        nonzero = p[p > 0]
        per_direction.append([(p * (i - j) ** 2).sum(), (p * abs(i - j)).sum(), (p / (1 + (i - j) ** 2)).sum(),
                              (p ** 2).sum(), (p * (i - mu) * (j - mu)).sum() / sigma2,
                              -(nonzero * np.log2(nonzero)).sum()])
    return np.mean(per_direction, axis=0)


def test_glcm_features_match_a_loop_reference():
    image = random_images((1, 12, 10), seed=2)
    extractor = RadiomicsFeatures(2, bins=8)
    values = named(extractor, extractor.extract(image)[0])
    ours = np.array([values[f"glcm_{n}"] for n in GLCM_NAMES])
    np.testing.assert_allclose(ours, reference_glcm_features(image[0], 8), rtol=1e-10)


def test_haar_band_energies_add_up_to_the_image_energy_and_locate_stripes():
    image = random_images((1, 20, 16), seed=3)
    extractor = RadiomicsFeatures(2)
    values = named(extractor, extractor.extract(image)[0])
    bands = sum(values[f"wavelet_{b}_energy"] for b in ("LL", "LH", "HL", "HH"))
    assert bands == pytest.approx(float((image.astype(np.float64) ** 2).mean()), rel=1e-9)
    stripes = np.tile(np.where(np.arange(16) % 2 == 0, 0.5, -0.5), (16, 1)).astype(np.float32)[None]
    stripe_values = named(extractor, extractor.extract(stripes)[0])  # alternates along axis 1 only
    assert stripe_values["wavelet_LH_energy"] == pytest.approx(0.25)
    assert stripe_values["wavelet_LL_energy"] == stripe_values["wavelet_HL_energy"] == 0.0


def test_log_energy_of_white_noise_falls_with_scale():
    noise = np.random.default_rng(0).uniform(-1, 1, (2, 64, 64)).astype(np.float32)
    extractor = RadiomicsFeatures(2, log_sigmas=(1.0, 2.0, 4.0))
    energies = extractor.extract(noise)[:, [extractor.feature_names.index(f"log_sigma{s:g}_energy")
                                            for s in (1, 2, 4)]]
    assert (np.diff(energies, axis=1) < 0).all() and (energies > 0).all()


def test_label_features_equal_the_features_of_the_region_cut_out():
    images = random_images((3, 32, 32), seed=7)
    masks = np.zeros(images.shape, np.int64)
    masks[:, 5:21, 8:30] = 2  # a rectangle, so the region is itself an image
    masks[:, 24:, :] = 1
    masks[1, 30, 0] = 0  # label 1 slightly irregular in one image
    extractor = RadiomicsFeatures(2, labels=[2, 1])
    with_labels = extractor.extract(images, masks)
    whole = RadiomicsFeatures(2)
    cropped = whole.extract(np.ascontiguousarray(images[:, 5:21, 8:30]))
    names = extractor.feature_names
    label2 = with_labels[:, [names.index(f"label2_{n}") for n in REGION_NAMES]]
    np.testing.assert_allclose(label2, cropped[:, :len(REGION_NAMES)], rtol=1e-9, atol=1e-12)
    assert (with_labels[:, names.index("label2_present")] == 1).all()
    # The whole-image part does not change when labels are added.
    np.testing.assert_array_equal(with_labels[:, :whole.num_features], whole.extract(images))
    # A label covering every pixel describes the whole image.
    everywhere = RadiomicsFeatures(2, labels=[4]).extract(images, np.full(images.shape, 4))
    np.testing.assert_allclose(everywhere[:, -len(REGION_NAMES):], everywhere[:, :len(REGION_NAMES)], rtol=1e-9)


def test_absent_label_gives_presence_zero_and_finite_zeros():
    images = random_images((2, 16, 16))
    masks = np.zeros(images.shape, np.int64)
    masks[0, 4:8, 4:8] = 3
    masks[1, 0, 0] = 3  # a single pixel: present, but no GLCM pairs
    extractor = RadiomicsFeatures(2, labels=[3, 9])
    features = extractor.extract(images, masks)
    names = extractor.feature_names
    assert np.isfinite(features).all()
    assert features[:, names.index("label3_present")].tolist() == [1.0, 1.0]
    assert features[:, names.index("label9_present")].tolist() == [0.0, 0.0]
    assert (features[:, [names.index(f"label9_{n}") for n in REGION_NAMES]] == 0).all()
    single = named(extractor, features[1])
    assert single["label3_firstorder_mean"] == pytest.approx(float(images[1, 0, 0]))
    assert single["label3_glcm_contrast"] == 0.0 and single["label3_glcm_asm"] == 0.0


def test_radiomics_rows_do_not_depend_on_the_batch_and_need_masks_for_labels():
    images = random_images((7, 20, 20, 20), seed=1)
    masks = (images > 0).astype(np.int64)
    extractor = RadiomicsFeatures(3, labels=[1])
    features = extractor.extract(images, masks, batch_size=64)
    assert features.shape == (7, len(extractor.feature_names)) and np.isfinite(features).all()
    np.testing.assert_allclose(extractor.extract(images, masks, batch_size=3), features, rtol=1e-12)
    np.testing.assert_allclose(extractor.extract(images[4:], masks[4:]), features[4:], rtol=1e-12)
    with pytest.raises(ValueError, match="no masks"):
        extractor.extract(images)
    with pytest.raises(ValueError, match="spatial_dims=3"):
        extractor.extract(images[:, 0])


# ------------------------------------------------------------------------------------------------ F2


@pytest.mark.parametrize("shape", [(3, 1, 24, 20), (2, 1, 10, 12, 8)])
def test_augment_is_reproducible_bounded_and_reduces_to_flips_at_strength_zero(shape):
    images = torch.from_numpy(random_images((shape[0], *shape[2:]), seed=4))[:, None]
    first = augment(images, torch.Generator().manual_seed(0))
    assert first.shape == images.shape and first.min() >= -1 and first.max() <= 1
    assert torch.equal(first, augment(images, torch.Generator().manual_seed(0)))
    assert not torch.allclose(first, augment(images, torch.Generator().manual_seed(1)))
    assert (first - images).abs().mean() > 0.05
    flipped_only = augment(images, torch.Generator().manual_seed(2), strength=0.0)
    spatial = range(2, images.ndim)
    for sample, source in zip(flipped_only, images):
        candidates = [source.flip([a - 1 for a in axes])
                      for r in range(len(spatial) + 1) for axes in itertools.combinations(spatial, r)]
        assert min((sample - c).abs().max().item() for c in candidates) < 1e-5


def test_nt_xent_known_answer():
    views = torch.eye(4)  # 4 orthogonal pairs, each view identical to its partner
    temperature = 0.5
    expected = -np.log(np.exp(1 / temperature) / (np.exp(1 / temperature) + 6))
    assert nt_xent_loss(views, views.clone(), temperature).item() == pytest.approx(expected, rel=1e-6)
    swapped = nt_xent_loss(views, views[[1, 0, 3, 2]], temperature).item()
    assert swapped > expected + 1.0  # wrong partners: the loss must be much higher


def test_self_supervised_fit_is_deterministic_and_extract_is_batch_independent():
    images = blob_images(12, 24, seed=0)
    fitted = [SelfSupervisedEncoder(2, embedding_dim=16, channels=(8, 16), seed=5).fit(images, steps=3, batch_size=8)
              for _ in range(2)]
    embeddings = fitted[0].extract(images, batch_size=64)
    np.testing.assert_array_equal(embeddings, fitted[1].extract(images, batch_size=64))
    np.testing.assert_allclose(fitted[0].extract(images, batch_size=3), embeddings, rtol=1e-5, atol=1e-6)
    assert embeddings.shape == (12, 16) and embeddings.dtype == np.float64
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-6)
    other = SelfSupervisedEncoder(2, embedding_dim=16, channels=(8, 16), seed=6).fit(images, steps=3, batch_size=8)
    assert not np.allclose(other.extract(images), embeddings)


def test_save_load_round_trip_gives_identical_embeddings(tmp_path):
    images = blob_images(10, 24, seed=1)
    encoder = SelfSupervisedEncoder(2, embedding_dim=16, channels=(8, 16), seed=2, temperature=0.3)
    encoder.fit(images, steps=4, batch_size=8)
    folder = encoder.save(tmp_path / "f2")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    loaded = SelfSupervisedEncoder.load(folder)
    assert loaded.config() == encoder.config() and loaded.steps_trained == 4
    np.testing.assert_array_equal(loaded.extract(images), encoder.extract(images))
    # The BatchNorm running statistics travel too: a fresh encoder of the same seed embeds differently.
    assert not np.allclose(SelfSupervisedEncoder(2, embedding_dim=16, channels=(8, 16), seed=2).extract(images),
                           encoder.extract(images))


def test_volume_embedding_is_the_normalised_concatenation_of_plane_means():
    volumes = random_images((3, 10, 12, 8), seed=3)
    encoder_3d = SelfSupervisedEncoder(3, embedding_dim=16, channels=(8, 16), seed=1)
    embeddings = encoder_3d.extract(volumes)
    assert embeddings.shape == (3, 48)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-6)
    # Same seed, same 2D network: the volume embedding must be built from its slice embeddings.
    encoder_2d = SelfSupervisedEncoder(2, embedding_dim=16, channels=(8, 16), seed=1)
    for volume, embedding in zip(volumes, embeddings):
        planes = []
        for axis in (2, 1, 0):  # axial, coronal, sagittal
            slices = np.moveaxis(volume, axis, 0)
            margin = int(len(slices) * 0.1)
            planes.append(encoder_2d.extract(np.ascontiguousarray(slices[margin:len(slices) - margin])).mean(0))
        expected = np.concatenate(planes)
        np.testing.assert_allclose(embedding, expected / np.linalg.norm(expected), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(encoder_3d.extract(volumes, batch_size=3), embeddings, rtol=1e-5, atol=1e-6)
    encoder_3d.fit(volumes, steps=3, batch_size=3)  # trains the 2D encoder on slices of each plane
    fitted = encoder_3d.extract(volumes)
    assert fitted.shape == (3, 48) and np.isfinite(fitted).all() and not np.allclose(fitted, embeddings)


def retrieval_accuracy(encoder: SelfSupervisedEncoder, images: np.ndarray, strength: float) -> float:
    """Share of augmented views whose cosine nearest neighbour among the originals is their own source."""
    sources = encoder.extract(images)
    hits = []
    for seed in (100, 101, 102):
        views = augment(torch.from_numpy(images)[:, None], torch.Generator().manual_seed(seed), strength)[:, 0]
        nearest = (encoder.extract(views.numpy()) @ sources.T).argmax(1)
        hits.append(nearest == np.arange(len(images)))
    return float(np.mean(hits))


@pytest.mark.slow
def test_contrastive_training_learns_to_find_the_source_of_an_augmented_view():
    images = blob_images(64, 32, seed=0)
    encoder = SelfSupervisedEncoder(2, channels=(16, 32, 64), seed=0)
    before = {s: retrieval_accuracy(encoder, images, s) for s in (0.5, 1.0)}
    encoder.fit(images, steps=150, batch_size=64)
    after = {s: retrieval_accuracy(encoder, images, s) for s in (0.5, 1.0)}
    print(f"retrieval top-1 untrained {before}, trained {after}")
    assert after[0.5] >= before[0.5] + 0.25
    assert after[1.0] >= before[1.0] + 0.1

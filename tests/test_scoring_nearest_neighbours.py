"""Chunked exact k-NN: equals brute force for every chunking, never builds more than one chunk x chunk block."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from radsynth.pipelines.scoring import nearest_neighbours
from radsynth.pipelines.scoring.nearest_neighbours import chunked_nearest_neighbours


def brute_force(queries: np.ndarray, references: np.ndarray, k: int, metric: str, exclude_self: bool = False):
    if metric == "cosine":
        q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        r = references / np.linalg.norm(references, axis=1, keepdims=True)
        distances = 1.0 - q @ r.T
    else:
        distances = np.linalg.norm(queries[:, None, :] - references[None, :, :], axis=2)
    if exclude_self:
        np.fill_diagonal(distances, np.inf)
    order = np.argsort(distances, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(distances, order, 1), order


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("chunk", [1, 7, 16, 41, 1000])
def test_chunked_search_equals_brute_force(metric, k, chunk):
    rng = np.random.default_rng(0)
    queries, references = rng.normal(size=(53, 6)), rng.normal(size=(41, 6))  # 7 and 16 do not divide 53 or 41
    distances, indices = chunked_nearest_neighbours(queries, references, k=k, metric=metric, chunk=chunk)
    expected_distances, expected_indices = brute_force(queries, references, k, metric)
    assert distances.shape == indices.shape == (53, k)
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_allclose(distances, expected_distances, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_exclude_self_skips_only_the_row_itself(k, chunk):
    rng = np.random.default_rng(1)
    points = rng.normal(size=(30, 4))
    points[7] = points[3]  # a duplicate elsewhere in the set is still a neighbour, at distance 0
    distances, indices = chunked_nearest_neighbours(points, points, k=k, chunk=chunk, exclude_self=True)
    expected_distances, expected_indices = brute_force(points, points, k, "euclidean", exclude_self=True)
    assert not (indices == np.arange(30)[:, None]).any()
    np.testing.assert_allclose(distances, expected_distances, atol=1e-12)
    assert indices[3, 0] == 7 and indices[7, 0] == 3 and distances[3, 0] == 0.0
    same_point = {7: 3}  # rows 3 and 7 are one point: either may win a tie for another query
    canonical = np.vectorize(lambda i: same_point.get(i, i))
    others = np.setdiff1d(np.arange(30), [3, 7])
    np.testing.assert_array_equal(np.sort(canonical(indices[others]), 1), np.sort(canonical(expected_indices[others]), 1))


def test_exact_copy_of_a_large_float32_row_has_distance_exactly_zero():
    """The fast expansion |q|^2 + |r|^2 - 2q.r leaves rounding residue; the final distances must not."""
    rng = np.random.default_rng(2)
    references = rng.uniform(-1, 1, size=(20, 64 * 64)).astype(np.float32)
    queries = np.concatenate([references[[4, 11]], rng.uniform(-1, 1, size=(3, 64 * 64)).astype(np.float32)])
    for metric in ("euclidean", "cosine"):
        distances, indices = chunked_nearest_neighbours(queries, references, metric=metric, chunk=8)
        assert distances[0, 0] == 0.0 and distances[1, 0] == 0.0, metric
        assert indices[:2, 0].tolist() == [4, 11]
        assert (distances[2:, 0] > 0).all()


def test_types_follow_the_input_and_float64_is_kept():
    rng = np.random.default_rng(3)
    data = rng.normal(size=(10, 3))
    distances, indices = chunked_nearest_neighbours(data, data[:4], k=2)
    assert isinstance(distances, np.ndarray) and distances.dtype == np.float64 and indices.dtype == np.int64
    distances, indices = chunked_nearest_neighbours(torch.as_tensor(data, dtype=torch.float32), data[:4])
    assert isinstance(distances, torch.Tensor) and distances.dtype == torch.float32


def test_images_are_flattened_rows():
    rng = np.random.default_rng(4)
    images = rng.normal(size=(12, 5, 6, 2))
    distances, indices = chunked_nearest_neighbours(images[:5], images, k=2, chunk=4)
    expected_distances, expected_indices = brute_force(images[:5].reshape(5, -1), images.reshape(12, -1), 2, "euclidean")
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_allclose(distances, expected_distances, atol=1e-12)


@pytest.mark.parametrize("k", [1, 5])
def test_no_block_larger_than_chunk_squared_is_ever_built(monkeypatch, k):
    """Spy on the one function that builds query x reference blocks: it must see chunk-sized pieces only.

    A search that materialised the full 300 x 250 matrix would show a block of 75,000 entries (or no block calls).
    """
    shapes = []
    block_scores = nearest_neighbours._block_scores

    def spy(queries, references, *args):
        shapes.append((len(queries), len(references)))
        return block_scores(queries, references, *args)

    monkeypatch.setattr(nearest_neighbours, "_block_scores", spy)
    rng = np.random.default_rng(5)
    queries, references = rng.normal(size=(300, 8)), rng.normal(size=(250, 8))
    chunk = 64
    distances, indices = chunked_nearest_neighbours(queries, references, k=k, chunk=chunk)
    assert len(shapes) == math.ceil(300 / chunk) * math.ceil(250 / chunk)
    assert max(q * r for q, r in shapes) <= chunk * chunk
    expected_distances, expected_indices = brute_force(queries, references, k, "euclidean")
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_allclose(distances, expected_distances, atol=1e-12)


def test_bad_arguments_are_refused():
    data = np.zeros((5, 2))
    with pytest.raises(ValueError, match="metric"):
        chunked_nearest_neighbours(data, data, metric="manhattan")
    with pytest.raises(ValueError, match="k must be"):
        chunked_nearest_neighbours(data, data, k=5, exclude_self=True)
    with pytest.raises(ValueError, match="values per row"):
        chunked_nearest_neighbours(data, np.zeros((5, 3)))
    with pytest.raises(ValueError, match="one set"):
        chunked_nearest_neighbours(data, data[:4], exclude_self=True)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_inexact_mode_ranks_the_same_and_is_close(metric):
    """``exact=False`` skips the refinement: same neighbours, distances within rounding of the exact ones."""
    rng = np.random.default_rng(6)
    queries, references = rng.normal(size=(40, 300)).astype(np.float32), rng.normal(size=(70, 300)).astype(np.float32)
    exact_d, exact_i = chunked_nearest_neighbours(queries, references, k=3, metric=metric, chunk=16)
    fast_d, fast_i = chunked_nearest_neighbours(queries, references, k=3, metric=metric, chunk=16, exact=False)
    np.testing.assert_array_equal(fast_i, exact_i)
    np.testing.assert_allclose(fast_d, exact_d, rtol=1e-4, atol=1e-5)

"""Real-side scoring work computed once: a cached run scores exactly as an uncached one, and reuses the work."""

from __future__ import annotations

import json

import numpy as np
import pytest

from radsynth.configs import load_scoring_config
from radsynth.pipelines.scoring.evaluate import ScoringInputs, score
from radsynth.pipelines.scoring.real_side import RealSideCache

from .test_scoring_evaluate import FAST, phantom_sets  # noqa: F401 (the fixture)


def _settings(*overrides):
    return load_scoring_config([*FAST, "scoring.utility=true", "scoring.feature_spaces=[random_cnn,self_supervised]",
                                *overrides])


def _rows(result) -> list[dict]:
    return json.loads(result.paths["json"].read_text())["rows"]


def _per_sample(result) -> str:
    return result.paths["per_sample"].read_text()


@pytest.mark.slow
def test_a_cached_real_side_leaves_every_number_unchanged_and_is_not_recomputed(tmp_path, phantom_sets):  # noqa: F811
    train, holdout, test, unseen = phantom_sets
    settings = _settings()
    # Stand-ins with real label maps, so mask Dice and segmentation utility run too; the second set is smaller.
    first, fresh = unseen, unseen.subset(range(len(unseen) - 3))
    logs: list[str] = []

    def run(synthetic, name, cache_dir):
        inputs = ScoringInputs(synthetic, train, holdout, test, attributes=["finding"])
        return score(inputs, settings, tmp_path / name, log=logs.append, cache_dir=cache_dir)

    def counts() -> tuple[int, int]:
        """(reused, computed) from the run's last log line."""
        return tuple(int(word) for word in logs[-1].split() if word.isdigit())

    uncached = [run(s, f"uncached-{i}", None) for i, s in enumerate((first, fresh))]
    cold = run(first, "cold", tmp_path / "cache")
    # Within the cold run only duplicates are reused: train-on-real is the augmentation study's full-data arm.
    duplicates, computed = counts()
    warm = run(first, "warm", tmp_path / "cache")
    assert counts() == (duplicates + computed, 0)
    fresh_warm = run(fresh, "fresh", tmp_path / "cache")  # only the floors at its sample size are new
    reused, new = counts()
    assert 0 < new < reused

    for cached, reference in ((cold, uncached[0]), (warm, uncached[0]), (fresh_warm, uncached[1])):
        assert _rows(cached) == _rows(reference)
        assert _per_sample(cached) == _per_sample(reference)
    sections = {row["section"] for row in _rows(warm)}
    assert sections == {"realism", "adherence", "privacy", "utility"}
    assert all(not path.name.startswith(".") for path in (tmp_path / "cache").iterdir())  # no temporaries left


def _cache(folder, train, settings, model=None):
    return RealSideCache(folder, [train], settings.model_dump(mode="json"), seed=0, model=model)


def test_the_key_follows_the_real_data_and_the_settings_that_change_real_side_work(tmp_path, phantom_sets):  # noqa: F811
    train = phantom_sets[0]
    settings = _settings()
    key = _cache(None, train, settings).key("features", {})
    changed = train.subset(range(len(train)))
    changed.images = changed.images.copy()
    changed.images[0, 0, 0] += 1e-3
    assert _cache(None, changed, settings).key("features", {}) != key
    assert _cache(None, train, _settings("scoring.bootstrap_samples=30")).key("features", {}) != key
    # Which samples are scored is not real-side work.
    assert _cache(None, train, _settings("scoring.max_samples=4")).key("features", {}) == key
    assert _cache(None, train, settings).key("features", {"n": 5}) != key
    with pytest.raises(ValueError, match="no model hash"):
        _cache(None, train, settings).key("membership", {}, uses_model=True)
    assert (_cache(None, train, settings, model="a").key("membership", {}, uses_model=True)
            != _cache(None, train, settings, model="b").key("membership", {}, uses_model=True))


def test_entries_are_computed_once_and_read_back_exactly(tmp_path, phantom_sets):  # noqa: F811
    train = phantom_sets[0]
    settings = _settings()
    calls = []

    def compute():
        calls.append(1)
        return {"x": np.random.default_rng(0).normal(size=(5, 3)), "shape": (2, 3)}

    first = _cache(tmp_path, train, settings).arrays("features", compute)
    again = _cache(tmp_path, train, settings).arrays("features", compute)  # a new run: from disk
    assert len(calls) == 1
    assert np.array_equal(first["x"], again["x"]) and again["shape"].tolist() == [2, 3]
    record = _cache(tmp_path, train, settings).record("floor", lambda: {"v": np.float64(0.1) / 3, "nan": float("nan")})
    stored = _cache(tmp_path, train, settings).record("floor", lambda: pytest.fail("recomputed"))
    assert stored["v"] == record["v"] == 0.1 / 3 and np.isnan(stored["nan"])


def test_nothing_is_unpickled_from_the_cache_folder(tmp_path, phantom_sets):  # noqa: F811
    train = phantom_sets[0]
    cache = _cache(tmp_path, train, _settings())
    planted = tmp_path / f"{cache.key('features', {})}.npz"
    np.savez(planted, x=np.array([{"a": 1}], dtype=object))  # an object array: only a pickle could load it
    with pytest.raises(ValueError, match="allow_pickle"):
        cache.arrays("features", lambda: {"x": np.zeros(1)})

"""The synthetic side's per-sample scoring work in batches: any batching, in any process, gives the whole set's
embeddings and pixel matches, and a scorecard scored batch by batch elsewhere is the one scored in process."""

from __future__ import annotations

import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

from radsynth.pipelines.scoring import fan_out
from radsynth.pipelines.scoring.features import RadiomicsFeatures, RandomCNNFeatures
from radsynth.pipelines.scoring.privacy import pixel_nearest_neighbours

from .test_scoring_evaluate import _score, phantom_sets  # noqa: F401  (a fixture)


class Recording:
    """A map that runs every batch in one of two other processes and remembers the batch sizes it was given."""

    def __init__(self):
        self.sizes: list[int] = []
        # Spawned, not forked: a fork of a process whose torch threads are running can deadlock.
        self.pool = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"))

    def __call__(self, work, batches):
        self.sizes += [len(images) for images, _ in batches]
        return list(self.pool.map(work, batches))


def test_batches_in_other_processes_give_the_whole_sets_embeddings_and_pixel_matches(phantom_sets):  # noqa: F811
    train, holdout, _, unseen = phantom_sets
    synthetic = unseen.subset(range(20))
    recording = Recording()
    for extractor in (RandomCNNFeatures(2, seed=3), RadiomicsFeatures(2, labels=[1, 2])):
        whole = extractor.extract(synthetic.images, synthetic.masks)
        batched = fan_out.embed(extractor, synthetic, True, recording, batch_size=8)
        np.testing.assert_allclose(batched, whole, rtol=1e-5, atol=1e-6)
    assert recording.sizes == [8, 8, 4] * 2

    settings = {"max_shift": 1, "comparison_size": 16, "chunk": 64}
    whole = pixel_nearest_neighbours(synthetic.images, train.images, **settings)
    batched = fan_out.pixel_matches(synthetic, train.images, settings, recording, batch_size=6)
    assert recording.sizes[-4:] == [6, 6, 6, 2]
    np.testing.assert_array_equal(batched.train_index, whole.train_index)
    np.testing.assert_allclose(batched.correlation, whole.correlation, rtol=1e-6)
    assert batched.comparison_shape == whole.comparison_shape and batched.shift.shape == whole.shift.shape
    recording.pool.shutdown()


@pytest.mark.slow
def test_a_scorecard_scored_batch_by_batch_in_other_processes_is_the_one_scored_in_process(
        tmp_path, phantom_sets):  # noqa: F811
    from radsynth.configs import load_scoring_config
    from radsynth.pipelines.scoring.evaluate import ScoringInputs, score

    from .test_scoring_evaluate import FAST

    train, holdout, test, unseen = phantom_sets
    inputs = ScoringInputs(unseen, train, holdout, test, attributes=["finding"])
    cards = {}
    recording = Recording()
    for name, map_batches in (("in process", fan_out.in_process), ("fanned out", recording)):
        settings = load_scoring_config([*FAST, "scoring.utility=false", "scoring.batch_size=16"])
        cards[name] = json.loads(score(inputs, settings, tmp_path / name.replace(" ", "_"), log=lambda _: None,
                                       map_batches=map_batches).paths["json"].read_text())["rows"]
    recording.pool.shutdown()
    assert recording.sizes and max(recording.sizes) == 16
    assert [(r["metric"], r["feature_space"], r["stratum"]) for r in cards["fanned out"]] == \
        [(r["metric"], r["feature_space"], r["stratum"]) for r in cards["in process"]]
    for ours, theirs in zip(cards["fanned out"], cards["in process"]):
        expected = theirs["value"] if theirs["value"] is None else pytest.approx(theirs["value"], rel=1e-4, abs=1e-6)
        assert ours["value"] == expected, ours["metric"]

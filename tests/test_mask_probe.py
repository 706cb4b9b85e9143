"""The ControlNet's validation probe: Dice of generated images against their maps, next to the real ceiling."""

from __future__ import annotations

import numpy as np
import pytest

from radsynth.pipelines.data.ingest import ingest
from radsynth.pipelines.sampling.pipeline import RadsynthPipelineOutput
from radsynth.pipelines.scoring.loading import cached_split
from radsynth.pipelines.scoring.mask_probe import MaskAdherenceProbe

from .test_training_stage import tiny_config


class ShowsTheseImages:
    """Stands in for a generator to give the probe known answers: it returns fixed images for the maps it gets."""

    def __init__(self, images: np.ndarray):
        self.images, self.seen = images, []

    def __call__(self, prompts, label_maps, **kwargs):
        self.seen.append(np.asarray(label_maps))
        start = sum(len(maps) for maps in self.seen[:-1])
        return RadsynthPipelineOutput(images=self.images[start:start + len(prompts), None], latent_std=1.0)


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    config = tiny_config(tmp_path_factory.mktemp("run"), "data.phantom.n_cases=40")
    ingest(config, progress=False)
    train, test = cached_split(config, "train"), cached_split(config, "test")
    label_names = {value: f"label{value}" for value in range(int(train.masks.max()) + 1)}
    return MaskAdherenceProbe.fit(train.images, train.masks, test.images, test.masks, test.prompts, label_names,
                                  segmenter_steps=150, batch_size=3), test


def test_real_images_in_place_of_generated_ones_score_the_ceiling_exactly(probe):
    probe, test = probe
    generator = ShowsTheseImages(test.images)
    logs = probe(generator)
    np.testing.assert_array_equal(np.concatenate(generator.seen)[:, 0], test.masks)  # every held-out map, in order
    for name in probe.names:
        np.testing.assert_equal(logs[f"dice/{name}"], logs[f"dice_real/{name}"])  # NaN: label in no map
    assert logs["dice_ratio_mean"] == pytest.approx(1.0) and logs["dice_real_mean"] > 0.3  # it learnt something


def test_images_that_show_nothing_score_far_below_the_ceiling(probe):
    probe, test = probe
    logs = probe(ShowsTheseImages(np.full_like(test.images, -1.0)))
    assert logs["dice_mean"] < 0.3 * logs["dice_real_mean"] and logs["dice_ratio_mean"] < 0.3

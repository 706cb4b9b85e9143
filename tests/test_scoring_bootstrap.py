"""The patient-level bootstrap: whole patients are resampled, several numbers share one set of resamples."""

from __future__ import annotations

import numpy as np

from radsynth.pipelines.scoring.bootstrap import bootstrap, bootstrap_many, group_members, group_resample
from radsynth.pipelines.scoring.realism import frechet_distance_features, with_real_floor


def test_a_replicate_takes_every_image_of_each_drawn_patient():
    groups = ["p0", "p0", "p1", "p2", "p2", "p2"]
    members = group_members(groups)
    rng = np.random.default_rng(0)
    for _ in range(20):
        rows = group_resample(members, rng)
        drawn = [groups[i] for i in rows]
        for patient in set(drawn):  # a patient comes with all its images, as many times as it was drawn
            assert drawn.count(patient) % groups.count(patient) == 0
        assert len(set(drawn)) <= 3 and sum(drawn.count(p) // groups.count(p) for p in set(drawn)) == 3


def test_bootstrap_many_gives_each_number_the_interval_its_own_bootstrap_would():
    rng = np.random.default_rng(1)
    values = rng.normal(size=40)
    groups = [f"p{i // 2}" for i in range(40)]
    mean, spread = bootstrap_many(lambda rows: [values[rows].mean(), values[rows].std()], [groups], 100, seed=3)
    assert mean == bootstrap(lambda rows: values[rows].mean(), [groups], 100, seed=3)
    assert spread == bootstrap(lambda rows: values[rows].std(), [groups], 100, seed=3)
    assert mean.ci_low < values.mean() < mean.ci_high and mean.sd > 0


def test_real_floor_with_named_metrics_equals_one_call_per_metric():
    rng = np.random.default_rng(2)
    synthetic, train, unseen = rng.normal(0.5, size=(30, 4)), rng.normal(size=(60, 4)), rng.normal(size=(40, 4))
    groups = ([f"s{i}" for i in range(30)], [f"t{i // 2}" for i in range(60)], [f"u{i}" for i in range(40)])
    both = with_real_floor(lambda a, b: {"fd": frechet_distance_features(a, b), "mean_gap": float(a.mean() - b.mean())},
                           synthetic, train, unseen, *groups, n_boot=30, seed=0)
    alone = with_real_floor(frechet_distance_features, synthetic, train, unseen, *groups, n_boot=30, seed=0)
    assert both["synthetic"]["fd"] == alone["synthetic"] and both["real_floor"]["fd"] == alone["real_floor"]
    assert both["synthetic"]["mean_gap"].value > both["real_floor"]["mean_gap"].value  # the shift shows

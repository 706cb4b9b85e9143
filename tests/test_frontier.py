"""Privacy-aware checkpoint selection: the choice rule as a known answer, the frontier file, and a training run
whose saved model carries exactly the weights of the point it chose."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from radsynth.pipelines.data.ingest import ingest
from radsynth.pipelines.scoring.frontier import FrontierPoint, choose, read_frontier, write_frontier
from radsynth.pipelines.training import train

from .test_training_stage import tiny_config


def point(step, coverage, dcr_share=0.5, copy_rate=0.0):
    return FrontierPoint(step, coverage, 0.6, dcr_share, 0.62, copy_rate, 0.08)


def test_the_most_realistic_private_point_is_chosen_and_a_leaking_one_never_is():
    points = [point(1000, 0.30), point(2000, 0.55), point(3000, 0.70, dcr_share=0.75), point(4000, 0.80, copy_rate=0.2)]
    assert choose(points).step == 2000  # 3000 and 4000 are more realistic, and leak
    assert not points[2].private and not points[3].private and points[1].private
    assert choose([point(1000, 0.5), point(2000, 0.5)]).step == 2000  # a tie keeps the later weights
    assert choose([point(1000, 0.9, dcr_share=0.9)]) is None
    assert choose([]) is None


def test_the_frontier_file_round_trips_marks_the_choice_and_a_resume_drops_later_points(tmp_path):
    points = [point(1000, 0.30), point(2000, 0.55), point(3000, 0.70, dcr_share=0.75)]
    write_frontier(points, tmp_path)
    assert read_frontier(tmp_path / "frontier.csv") == points
    assert read_frontier(tmp_path / "frontier.csv", up_to_step=2500) == points[:2]
    with open(tmp_path / "frontier.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["private"], row["chosen"]) for row in rows] == [("True", "False"), ("True", "True"),
                                                                 ("False", "False")]
    assert (tmp_path / "frontier.png").stat().st_size > 1000


@pytest.mark.slow
def test_training_on_the_frontier_saves_the_weights_of_the_point_it_chose(tmp_path):
    config = tiny_config(tmp_path / "run", "diffusion.max_steps=6", "diffusion.frontier_every=2",
                         "diffusion.frontier_samples=8", "diffusion.validate_every=100",
                         "scoring.self_supervised_steps=5", "scoring.bootstrap_samples=10")
    ingest(config, progress=False)
    result = train(config, progress=False)
    folder = tmp_path / "run" / "train" / "diffusion" / "frontier"
    points = read_frontier(folder / "frontier.csv")
    assert [p.step for p in points] == [2, 4, 6]
    assert all(0 <= p.coverage <= 1 and 0 <= p.dcr_share <= 1 and p.dcr_share_limit > 0.5 for p in points)
    chosen = choose(points)
    record = json.loads((folder / "chosen.json").read_text())
    assert record["kept_step"] == (chosen.step if chosen else None) and record["points"] == 3
    card = (result.model_dir / "README.md").read_text()
    assert "privacy-realism frontier" in card
    # Weights are kept only for private points that were the best so far: never for a leaking one.
    kept_steps = {int(path.name[5:12]) for path in folder.glob("step-*-0.safetensors")}
    assert kept_steps <= {p.step for p in points if p.private}


@pytest.mark.slow
def test_an_earlier_point_chosen_puts_its_weights_into_the_saved_model(tmp_path, monkeypatch):
    """The choice's mechanics with a scripted score (realism falling with the steps, all private): the saved
    model is step 2's EMA weights, not the last step's, and the card says so. The images it is given are the
    pipeline's own samples."""
    from radsynth.pipelines import training_frontier

    seen = []

    class Scripted:
        def __init__(self, config):
            pass

        def score(self, step, images):
            seen.append(images.shape)
            return FrontierPoint(step, 1.0 / step, 0.3, 0.5, 0.62, 0.0, 0.05)

    monkeypatch.setattr(training_frontier, "FrontierScorer", Scripted)
    config = tiny_config(tmp_path / "run", "diffusion.max_steps=6", "diffusion.frontier_every=2",
                         "diffusion.frontier_samples=8", "diffusion.validate_every=100")
    ingest(config, progress=False)
    result = train(config, progress=False)
    folder = tmp_path / "run" / "train" / "diffusion" / "frontier"
    assert seen == [(8, 32, 32)] * 3
    kept = load_file(str(folder / "step-0000002-0.safetensors"))
    saved = load_file(str(result.model_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    last = load_file(str(tmp_path / "run" / "train" / "diffusion" / "checkpoints" / "step-0000006" / "model.safetensors"))
    assert kept.keys() == saved.keys() and all(torch.equal(saved[key], kept[key]) for key in kept)
    assert any(not torch.equal(saved[key], last[key]) for key in kept if key in last)
    assert not (folder / "step-0000004-0.safetensors").exists()  # never the best so far: nothing kept
    assert "the weights kept are those of step 2 (of 6)" in (result.model_dir / "README.md").read_text()


def test_training_images_given_as_samples_are_not_private_and_unseen_real_ones_are(tmp_path):
    """Known answer for the scorer: planted copies of training images fail its privacy limits (the gate's rule:
    pixel or embedding matches), unseen real images of the holdout pass them."""
    from radsynth.pipelines.scoring.frontier import FrontierScorer
    from radsynth.pipelines.scoring.loading import cached_split

    config = tiny_config(tmp_path / "run", "data.phantom.n_cases=60", "scoring.self_supervised_steps=5",
                         "scoring.bootstrap_samples=20")
    ingest(config, progress=False)
    scorer = FrontierScorer(config)
    train, test = cached_split(config, "train"), cached_split(config, "test")
    copies = scorer.score(1, train.images[:8])
    unseen = scorer.score(2, test.images[:8])
    assert copies.copy_rate == 1.0 and not copies.private
    assert unseen.copy_rate <= unseen.copy_rate_limit and unseen.private

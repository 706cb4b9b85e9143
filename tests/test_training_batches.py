"""What training shows the model: prompts as sampling asks them (attribute-only beside whole ones), never stale
cached prompts, and cases drawn in balance over an attribute when asked."""

import re

import numpy as np
import pytest
import torch

from radsynth.generators.data import CachedLatents, ConditioningSpec, balance_weights, batch_indices, training_prompts
from radsynth.generators.latent_diffusion import LatentDiffusion
from radsynth.pipelines.data.ingest import ingest
from radsynth.pipelines.data.manifest import CaseRecord
from radsynth.pipelines.sampling.generate import sampling_conditions
from radsynth.pipelines.training import train

from .test_training_stage import tiny_config

HEADER = re.compile(r"^finding: [a-z]+(; view: (AP|PA))?\.")


def _record(text: str) -> CaseRecord:
    return CaseRecord(case_id="c1", patient_id="p1", modality="xray", body_region="chest", image="c1.png",
                      spacing=(1.0, 1.0), shape=(8, 8), text=text, attributes={"finding": "effusion", "view": "AP"},
                      source="test", sha256="0" * 64)


def test_the_attribute_prompt_is_the_whole_prompt_without_the_text_and_none_where_they_are_the_same():
    record = _record("Small left pleural effusion.")
    spec = ConditioningSpec(["finding", "view"], include_text=True)
    assert spec.prompt(record) == "finding: effusion; view: AP. Small left pleural effusion."
    assert spec.attribute_prompt(record) == "finding: effusion; view: AP."
    assert ConditioningSpec(["finding"], include_text=False).attribute_prompt(record) is None
    assert ConditioningSpec([], include_text=True).attribute_prompt(record) is None


def test_training_prompts_shorten_at_the_dropout_rate_and_draw_nothing_without_attribute_prompts():
    whole = [f"finding: none. Case {i} text." for i in range(400)]
    batch = {"prompts": whole, "attribute_prompts": ["finding: none."] * 400}
    assert training_prompts(batch, 1.0, torch.Generator().manual_seed(0)) == batch["attribute_prompts"]
    assert training_prompts(batch, 0.0, torch.Generator().manual_seed(0)) == whole
    shortened = sum(p == "finding: none." for p in training_prompts(batch, 0.25, torch.Generator().manual_seed(0)))
    assert 70 <= shortened <= 130  # 100 expected; binomial sd 8.7
    generator = torch.Generator().manual_seed(0)
    assert training_prompts({"prompts": whole}, 0.5, generator) == whole
    assert torch.equal(generator.get_state(), torch.Generator().manual_seed(0).get_state())


@pytest.fixture
def conditioned_prompts(monkeypatch):
    """Every prompt list the training loss conditions on (the real method still runs); the loss is the caller that
    passes ``keep`` (classifier-free dropout), validation samples do not."""
    seen: list[list[str]] = []
    condition = LatentDiffusion.condition

    def recording(self, prompts, *args, **kwargs):
        if kwargs.get("keep") is not None:
            seen.append(list(prompts))
        return condition(self, prompts, *args, **kwargs)

    monkeypatch.setattr(LatentDiffusion, "condition", recording)
    return seen


def test_training_shows_attribute_only_prompts_at_text_dropout_and_never_stale_cached_ones(tmp_path, conditioned_prompts):
    steps = ["diffusion.max_steps=6", "diffusion.validate_every=100", "diffusion.batch_size=4"]
    config = tiny_config(tmp_path, *steps, "conditioning.attributes=[finding]", "conditioning.text_dropout=1.0")
    ingest(config, progress=False)
    train(config, progress=False)
    trained = [prompt for batch in conditioned_prompts for prompt in batch]
    assert len(trained) == 24  # six steps of four
    # All attribute-only, as sampling asks (sampling prompts are in the same words)
    assert all(re.fullmatch(r"finding: [a-z]+\.", prompt) for prompt in trained), trained[:4]
    assert {choice.prompt for choice in sampling_conditions(config)} <= {
        f"finding: {value}." for value in ("none", "nodule", "consolidation", "effusion", "cardiomegaly",
                                           "pneumothorax")}

    latents_file = tmp_path / "train" / "latents.safetensors"
    encoded_at = latents_file.stat().st_mtime_ns
    conditioned_prompts.clear()
    # Another prompt (one more attribute, a mix of whole and attribute-only prompts) over the same autoencoder:
    # the cached latents are reused and the prompts are the new ones
    mixed = tiny_config(tmp_path, *steps, "conditioning.attributes=[finding,view]", "conditioning.text_dropout=0.5")
    train(mixed, progress=False)
    assert latents_file.stat().st_mtime_ns == encoded_at
    trained = [prompt for batch in conditioned_prompts for prompt in batch]
    assert len(trained) == 24 and all(HEADER.match(prompt) and "; view: " in prompt for prompt in trained)
    whole = [prompt for prompt in trained if "radiograph" in prompt]
    assert 0 < len(whole) < len(trained)  # both kinds, drawn per sample


def test_without_text_dropout_every_training_prompt_is_whole(tmp_path, conditioned_prompts):
    config = tiny_config(tmp_path, "diffusion.max_steps=3", "diffusion.validate_every=100",
                         "conditioning.text_dropout=0")
    ingest(config, progress=False)
    train(config, progress=False)
    trained = [prompt for batch in conditioned_prompts for prompt in batch]
    assert trained and all("radiograph" in prompt for prompt in trained)


def test_balance_weights_give_every_value_the_same_share_and_weighted_batches_follow_them():
    values = ["none"] * 90 + ["effusion"] * 8 + ["pneumothorax"] * 2
    records = [_record("").model_copy(update={"case_id": f"c{i}", "attributes": {"finding": value}})
               for i, value in enumerate(values)]
    weights = balance_weights(records, "finding")
    shares = {value: weights[[v == value for v in values]].sum() / weights.sum() for value in set(values)}
    assert shares == pytest.approx({"none": 1 / 3, "effusion": 1 / 3, "pneumothorax": 1 / 3})

    drawn = np.concatenate([batch_indices(100, 8, step, seed=0, weights=weights) for step in range(600)])
    rare = np.isin(drawn, [98, 99]).mean()
    assert 0.29 < rare < 0.38  # a third of 4,800 draws (sd 0.007); uniform batches would give 0.02
    # Same step, same batch (exact resume); two ranks split one global batch
    np.testing.assert_array_equal(batch_indices(100, 8, 5, 0, weights=weights), batch_indices(100, 8, 5, 0, weights=weights))
    both = batch_indices(100, 8, 5, 0, 0, 2, weights), batch_indices(100, 8, 5, 0, 1, 2, weights)
    np.testing.assert_array_equal(np.concatenate(both), batch_indices(100, 16, 5, 0, weights=weights))


def test_a_mask_generator_s_values_keep_the_cases_draw_weights_and_prompts():
    latents = CachedLatents(torch.zeros(3, 1, 2, 2), torch.zeros(3, 1, 2, 2), ["a. x", "b. y", "c. z"], torch.ones(3, 2),
                            attribute_prompts=["a.", "b.", "c."])
    latents.row_weights = np.array([1.0, 0.5, 0.5])
    shares = latents.with_values(torch.ones(3, 2, 4, 4), torch.zeros(3, 2, 4, 4))
    assert shares.row_weights is latents.row_weights and shares.attribute_prompts == ["a.", "b.", "c."]
    assert shares.batch([2], torch.Generator().manual_seed(0))["attribute_prompts"] == ["c."]

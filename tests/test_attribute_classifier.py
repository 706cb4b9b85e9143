"""The adherence classifier learns a real attribute from phantoms and falls to chance on shuffled labels."""

import random

import torch

from radsynth.pipelines.data.cache import read_cached_case
from radsynth.pipelines.data.ingest import ingest
from radsynth.pipelines.scoring.attribute_classifier import AttributeClassifier

from .test_training_stage import tiny_config


def test_classifier_recognises_views_and_is_at_chance_on_shuffled_labels(tmp_path):
    config = tiny_config(tmp_path, "data.phantom.n_cases=160")
    result = ingest(config, progress=False)
    train = [r for r in result.records if r.split == "train"]
    test = [r for r in result.records if r.split != "train"]

    def images(records):
        return torch.stack([torch.from_numpy(read_cached_case(result.cache_dir / f"{r.case_id}.safetensors").image)
                            for r in records])

    # Pneumothorax and large effusions change a whole hemithorax: the phantom's most visible findings.
    labels = ["abnormal" if r.attributes["finding"] in ("pneumothorax", "effusion", "consolidation") else "other"
              for r in train]
    test_labels = ["abnormal" if r.attributes["finding"] in ("pneumothorax", "effusion", "consolidation") else "other"
                   for r in test]
    classes = ["abnormal", "other"]
    fitted = AttributeClassifier([32, 32], classes, channels=(8, 16, 32)).fit(images(train), labels, steps=150)
    accuracy = fitted.balanced_accuracy(images(test), test_labels)

    shuffled = labels[:]
    random.Random(0).shuffle(shuffled)
    blind = AttributeClassifier([32, 32], classes, channels=(8, 16, 32)).fit(images(train), shuffled, steps=150)
    chance = blind.balanced_accuracy(images(test), test_labels)
    assert accuracy > 0.7, accuracy
    assert abs(chance - 0.5) < 0.2 and accuracy > chance + 0.15

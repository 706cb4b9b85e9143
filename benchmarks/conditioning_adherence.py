"""Does text conditioning work? Generate per prompted attribute value, classify with a CNN trained on real.

    python benchmarks/conditioning_adherence.py CONFIG [key=value ...] --attribute finding --per-class 16 \
        [--model DIR] [--classes a b] [--out report.json]

A MONAI classifier is trained on the real train split (class-balanced) to predict the attribute; its
balanced accuracy on the real test split is the ceiling. For each value, samples are generated from the
prompts of real test cases with that value (train cases when the test split has none); the share the
classifier assigns to the prompted value, against chance (1 / classes), measures adherence. A grid of the
samples, one row per value, is written next to the report. Prints one JSON object with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from radsynth.configs import load_config
from radsynth.generators.data import ConditioningSpec
from radsynth.pipelines.data.ingest import data_dir
from radsynth.pipelines.data.manifest import read_manifest
from radsynth.pipelines.sampling.generate import load_pipeline
from radsynth.pipelines.sampling.grids import save_grid
from radsynth.pipelines.scoring.attribute_classifier import AttributeClassifier
from radsynth.pipelines.training import model_dir


def images_of(records, cache_dir: Path) -> torch.Tensor:
    return torch.stack([load_file(str(cache_dir / f"{r.case_id}.safetensors"))["image"] for r in records])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--attribute", default="finding")
    parser.add_argument("--per-class", type=int, default=16)
    parser.add_argument("--model", default=None)
    parser.add_argument("--classes", nargs="*", default=None, help="generate only for these values")
    parser.add_argument("--classifier-steps", type=int, default=400)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    config = load_config(args.config, args.overrides)
    records = read_manifest(data_dir(config) / "manifest.jsonl")
    cache_dir = Path(json.loads((data_dir(config) / "summary.json").read_text())["cache"])
    key = args.attribute
    labelled = [r for r in records if r.attributes.get(key) not in (None, "")]
    train = [r for r in labelled if r.split == "train"]
    test = [r for r in labelled if r.split == "test"]
    classes = sorted({str(r.attributes[key]) for r in train})

    started = time.perf_counter()
    classifier = AttributeClassifier(config.data.preprocess.target_shape, classes, seed=config.runtime.seed)
    classifier.fit(images_of(train, cache_dir), [str(r.attributes[key]) for r in train], steps=args.classifier_steps)
    real_test = classifier.balanced_accuracy(images_of(test, cache_dir), [str(r.attributes[key]) for r in test])

    pipeline = load_pipeline(args.model or model_dir(config), config, progress=False)
    pipeline.set_progress_bar_config(disable=True)
    conditioning = ConditioningSpec(config.conditioning.attributes, config.conditioning.include_text)
    per_class, grids = {}, []
    for value in args.classes or classes:
        source = [r for r in test if str(r.attributes[key]) == value] or [r for r in train if str(r.attributes[key]) == value]
        prompts = [conditioning.prompt(source[i % len(source)]) for i in range(args.per_class)]
        generators = [torch.Generator().manual_seed(config.runtime.seed * 1000 + i) for i in range(args.per_class)]
        images = pipeline(prompts, num_inference_steps=config.sampling.num_inference_steps, generator=generators,
                          output_type="pt", **config.sampling.guidance).images
        predicted = classifier.predict(images.float().cpu())
        per_class[value] = {"share_assigned_to_prompt": float(np.mean([p == value for p in predicted])),
                            "predicted": {c: predicted.count(c) for c in classes if predicted.count(c)}}
        grids.append(images.cpu().numpy())
    out = Path(args.out) if args.out else config.output_dir / "eval" / f"adherence_{key}.json"
    grid = save_grid(np.concatenate(grids), rows=len(grids), path=out.with_suffix(".png"))
    report = {
        "attribute": key, "classes": classes, "per_class_samples": args.per_class,
        "sample_accuracy": float(np.mean([v["share_assigned_to_prompt"] for v in per_class.values()])),
        "chance": 1.0 / len(classes), "real_test_balanced_accuracy": real_test, "per_class": per_class,
        "model": str(args.model or model_dir(config)), "grid": str(grid), "seconds": round(time.perf_counter() - started, 1),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


if __name__ == "__main__":
    main()

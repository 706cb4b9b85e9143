"""Does the release gate refuse a build that copies its training data? Plant copies and try to release it.

    python benchmarks/planted_copies.py CONFIG [key=value ...] [--copies 4] [--out planted]

Takes a finished build (its samples, scored or not, and its model), copies the sample folder to ``--out``, and
overwrites the first ``--copies`` samples with training images (drawn with ``--seed``), written the way the
sampler writes samples (16-bit PNG at the sample's own mapping, or NIfTI on its affine): what a generator that
memorised those cases would emit. The copied folder is then scored (``radsynth evaluate``) and released into
``<out>/release``, so the build's own release stays untouched. Prints one JSON object: the gate's outcome, each
failed check with value and limit, the filter's drops, and the refusal report's folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from radsynth.configs import load_config
from radsynth.pipelines.data.io import write_nifti, write_png
from radsynth.pipelines.release.stage import ReleaseRefused, release
from radsynth.pipelines.sampling.writers import SYNTHETIC_DESCRIPTION, physical_to_png16
from radsynth.pipelines.scoring.evaluate import build_sample_dir, evaluate
from radsynth.pipelines.scoring.loading import cached_split


def plant_copies(folder: Path, physical_train: np.ndarray, copies: int, seed: int) -> list[int]:
    """Overwrite the first ``copies`` samples of ``folder`` with training images; returns their train indices."""
    sidecars = sorted(path for path in folder.glob("*.json") if "file" in json.loads(path.read_text()))
    if copies > len(sidecars):
        raise SystemExit(f"--copies {copies}: the build has only {len(sidecars)} samples")
    sources = np.random.default_rng(seed).choice(len(physical_train), copies, replace=False)
    for sidecar_path, source in zip(sidecars[:copies], sources):
        sidecar = json.loads(sidecar_path.read_text())
        image_path = folder / sidecar["file"]
        image = physical_train[source]
        if sidecar["format"] == "png16":
            write_png(image_path, physical_to_png16(image, sidecar["png_low"], sidecar["png_high"]))
        else:
            write_nifti(image_path, image.astype(np.float32), nib.load(image_path).affine,
                        description=SYNTHETIC_DESCRIPTION)
    return sources.tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="planted")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    config = load_config(args.config, [*args.overrides, f"release.destination={out / 'release'}"])

    samples = out / "samples"
    shutil.rmtree(samples, ignore_errors=True)
    shutil.copytree(build_sample_dir(config), samples)
    train = cached_split(config, "train")
    sources = plant_copies(samples, train.physical(), args.copies, args.seed)

    started = time.perf_counter()
    scored = evaluate(config, sample_dir=samples, out_dir=out / "eval", log=lambda *_: None)
    seconds = round(time.perf_counter() - started, 1)
    report: dict = {"config": args.config, "overrides": args.overrides, "copies": args.copies,
                    "samples": len(list(samples.glob("*.json"))), "evaluate_seconds": seconds,
                    "privacy_verdict": scored.scorecard.verdicts.get("privacy")}
    try:
        result = release(config, samples_dir=samples, eval_dir=out / "eval")
        report |= {"refused": False, "release": result.summary()}
    except ReleaseRefused as refused:
        gate_report = json.loads((refused.report / "gate_report.json").read_text())
        report |= {"refused": True, "report": str(refused.report), "filter": gate_report["filter"],
                   "failed": [{key: check[key] for key in ("name", "stratum", "value", "limit", "privacy", "reason")}
                              for check in refused.gate.to_dict()["checks"] if not check["passed"]]}
    report["planted_train_indices"] = sources  # indices into the cached train split, never case ids
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()

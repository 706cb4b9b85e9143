"""The autoencoder's ceiling: how real can this model's samples look, per feature space?

    python benchmarks/autoencoder_ceiling.py CONFIG [key=value ...] [--model DIR] [--n 64] [--out DIR]

Every sample of a latent diffusion model leaves through its autoencoder's decoder, so the decoder's
reconstructions of real images the model never trained on (the test split) are the best its samples can look.
Where they fall short of the real floor in a feature space (texture, say), more diffusion training cannot close
the gap; the autoencoder has to change. The reconstructions are written as a sample folder (marked derived from
real; scratch output, never released) and scored by ``radsynth evaluate`` itself, so the figures are the
scorecard's. Prints one JSON object with the machine: per space, the reconstructions' coverage and precision
with the real floor, beside the build's own samples' when its scorecard exists; and the radiomics features that
set the reconstructions apart most (mean difference in SDs of the real training images, the scorecard's scaling,
with the real test images' beside it: near 0 for every feature).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from build_scores import machine

from radsynth.configs import load_config
from radsynth.generators.prompts import render_prompt
from radsynth.pipelines.sampling.generate import load_pipeline
from radsynth.pipelines.sampling.pipeline import model_hash
from radsynth.pipelines.sampling.writers import write_sample
from radsynth.pipelines.scoring.evaluate import build_eval_dir, evaluate, real_scaling
from radsynth.pipelines.scoring.features.radiomics import RadiomicsFeatures
from radsynth.pipelines.scoring.loading import cached_split
from radsynth.pipelines.training import sampling_model_dir

REALISM = ("coverage", "precision")


def reconstruct(pipeline, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Encode (posterior mean) and decode, in [-1, 1], as sampling decodes."""
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(images[start:start + batch_size]).unsqueeze(1).to(pipeline.device, pipeline.vae.dtype)
            out.append(pipeline.decode(pipeline.vae.encode(x)).cpu().numpy()[:, 0])
    return np.concatenate(out)


def write_reconstructions(pipeline, test, reconstructions: np.ndarray, keys: list[str], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    digest = model_hash(pipeline)
    fmt = "png16" if reconstructions.ndim == 3 else "nifti"
    for index, (image, conditions) in enumerate(zip(reconstructions, test.conditions)):
        # The prompt states the attributes alone: a real case's report is never written out.
        sidecar = {"prompt": render_prompt("", conditions, keys), "conditions": conditions, "seed": 0,
                   "scheduler": "autoencoder reconstruction", "num_inference_steps": 0, "guidance_scale": 0.0,
                   "model_hash": digest, "derived_from_real": True, "modality": pipeline.config.modality}
        write_sample(folder, f"rec_{index:06d}", pipeline.to_physical(image), pipeline.config.spacing, fmt, sidecar,
                     png_range=(pipeline.config.intensity_low, pipeline.config.intensity_high))


def separating_features(train: np.ndarray, test: np.ndarray, reconstructions: np.ndarray, top: int = 8) -> list[dict]:
    """The radiomics features whose mean differs most between reconstructions and real training images, in SDs
    of the training images, scaled as the scorecard scales them (``real_scaling``)."""
    extractor = RadiomicsFeatures(train.ndim - 1)
    real, unseen, rebuilt = (extractor.extract(x) for x in (train, test, reconstructions))
    mean, sd = real_scaling(real)
    shift = lambda features: (features.mean(0) - mean) / sd  # noqa: E731
    rebuilt_shift, test_shift = shift(rebuilt), shift(unseen)
    order = np.argsort(-np.abs(rebuilt_shift))[:top]
    return [{"feature": extractor.feature_names[i], "reconstructions_sd": round(float(rebuilt_shift[i]), 2),
             "real_test_sd": round(float(test_shift[i]), 2)} for i in order]


def realism_rows(scorecard: Path) -> dict:
    """{space: {metric: value, "<metric>_floor": the real-vs-real reference}} of the scorecard's whole-set rows."""
    rows = json.loads(scorecard.read_text())["rows"]
    table: dict[str, dict] = {}
    for row in rows:
        if row["section"] == "realism" and row["metric"] in REALISM and row["stratum"] == "all":
            table.setdefault(row["feature_space"], {}).update(
                {row["metric"]: row["value"], f"{row['metric']}_floor": row.get("reference_value")})
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--model", default=None, help="model folder (default: the build's)")
    parser.add_argument("--n", type=int, default=64, help="test images to reconstruct")
    parser.add_argument("--out", type=Path, default=None, help="default: <output_dir>/autoencoder-ceiling")
    parser.add_argument("--train-n", type=int, default=512, help="real training images the feature shifts are "
                        "measured against")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    config = load_config(args.config, args.overrides)
    model = Path(args.model or sampling_model_dir(config))
    out = args.out or Path(config.runtime.output_dir) / "autoencoder-ceiling"
    started = time.perf_counter()
    pipeline = load_pipeline(model, config, progress=False, pairs=False)
    test = cached_split(config, "test", limit=args.n)
    reconstructions = reconstruct(pipeline, test.images)
    write_reconstructions(pipeline, test, reconstructions, list(config.conditioning.attributes), out / "samples")
    evaluate(config, model, sample_dir=out / "samples", out_dir=out / "eval", log=lambda *_: None)
    build_scorecard = build_eval_dir(config) / "scorecard.json"
    print(json.dumps({
        "config": args.config, "overrides": args.overrides, "model": str(model), "n": len(reconstructions),
        "reconstruction_mae": round(float(np.abs(reconstructions - test.images).mean()), 5),
        "reconstructions": realism_rows(out / "eval" / "scorecard.json"),
        "build_samples": realism_rows(build_scorecard) if build_scorecard.is_file() else None,
        "separating_radiomics": separating_features(cached_split(config, "train", limit=args.train_n).images,
                                                    test.images, reconstructions),
        "seconds": round(time.perf_counter() - started, 1),
        "machine": {**machine(), "torch": torch.__version__},
    }, indent=2))


if __name__ == "__main__":
    main()

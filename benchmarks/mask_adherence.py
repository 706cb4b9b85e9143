"""Do generated images show what their label maps draw? Mask adherence, with the segmenter's ceiling.

    python benchmarks/mask_adherence.py CONFIG [key=value ...] [--n 32] [--segmenter-steps 300]
        [--lesion "nodule 15 mm in right lung"] [--out report.json]

Ingests and trains (each a no-op when current) with ``conditioning.use_masks=true``. A MONAI UNet segmenter is
trained on the real train split; its per-label Dice on the real test split is the ceiling. Then each test case's
label map and prompt condition one generated image, the segmenter segments it, and the per-label Dice against the
conditioning map is the adherence. The segmenter's Dice on the autoencoder's reconstructions of the same test
images is the model's own ceiling: every generated image leaves through that decoder, so a label it loses there no
map input can draw. The same prompts drawn by the text-to-image model without the maps (the ControlNet off, or a
UNet that reads maps given none) are the floor: what the prompt alone gets right. The maps steer the images
through the model's ControlNet or, with ``conditioning.mask_input=concat``, the UNet's own input. With
``--lesion`` every test map first gets that edit (and its prompt the request): the report adds the requested
lesion size, the size in the edited maps, and the size the segmenter finds in the generated images. With
``mask_generator.enabled=true`` the report adds pairs from text alone: the mask generator draws each map from the
test prompt (and the lesion request), the image is drawn from it, and the segmenter's Dice against the drawn map
is reported with how much of the maps each label covers, generated against the real test maps. Prints one JSON
object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch
from autoencoder_ceiling import reconstruct

from radsynth.configs import load_config
from radsynth.generators.data import ConditioningSpec
from radsynth.pipelines.data.ingest import data_dir, ingest
from radsynth.pipelines.data.manifest import read_manifest
from radsynth.pipelines.masks import apply_lesion_edit, parse_lesion_request
from radsynth.pipelines.sampling.mask_to_image import RadsynthMaskToImagePipeline
from radsynth.pipelines.sampling.text_to_image import RadsynthTextToImagePipeline
from radsynth.pipelines.sampling.text_to_pair import RadsynthTextToPairPipeline
from radsynth.pipelines.scoring.loading import cached_split
from radsynth.pipelines.scoring.segmenter import Segmenter, per_label_dice
from radsynth.pipelines.training import model_dir, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--n", type=int, default=32, help="test cases to condition on (at most the test split)")
    parser.add_argument("--segmenter-steps", type=int, default=300)
    parser.add_argument("--lesion", help="lesion edit applied to every test map, e.g. 'nodule 15 mm in right lung'")
    parser.add_argument("--out")
    args = parser.parse_args()
    config = load_config(args.config, [*args.overrides, "conditioning.use_masks=true"])

    started = time.perf_counter()
    ingest(config, progress=False)
    train(config, progress=False)
    train_seconds = time.perf_counter() - started

    train_set, test_set = cached_split(config, "train"), cached_split(config, "test", limit=args.n)
    records = [r for r in read_manifest(data_dir(config) / "manifest.jsonl") if r.split == "test"][: args.n]
    label_names = records[0].label_names
    labels = sorted(value for value in label_names if value != 0)
    segmenter = Segmenter(train_set.images.ndim - 1, max(label_names) + 1, seed=config.runtime.seed)
    segmenter.fit(train_set.images, train_set.masks, steps=args.segmenter_steps)
    ceiling = per_label_dice(segmenter.predict(test_set.images), test_set.masks, labels)

    pipeline = RadsynthMaskToImagePipeline.from_model_dir(model_dir(config))
    pipeline.set_progress_bar_config(disable=True)
    conditioning = ConditioningSpec(config.conditioning.attributes, config.conditioning.include_text)
    prompts = [conditioning.prompt(record) for record in records]
    masks, lesion = test_set.masks.copy(), None
    if args.lesion:
        request = parse_lesion_request(args.lesion, label_names)
        rng, edits = np.random.default_rng(config.runtime.seed), []
        for i in range(len(masks)):
            masks[i], record = apply_lesion_edit(masks[i], test_set.spacing, request, label_names, rng)
            edits.append(record)
        prompts = [f"{prompt} {args.lesion}." for prompt in prompts]
        lesion = next(value for value, name in label_names.items() if name == request.lesion)
        voxel = float(np.prod(test_set.spacing)) / (1000.0 if masks.ndim == 4 else 1.0)  # ml in 3D, mm^2 in 2D
        sizes = {"unit": edits[0].volume_unit, "requested": float(np.median([e.requested_volume for e in edits])),
                 "in_edited_maps": float(np.median([e.achieved_volume for e in edits]))}
    autoencoder = per_label_dice(segmenter.predict(reconstruct(pipeline, test_set.images)), test_set.masks, labels)
    maps = masks[:, None]
    dice, seconds = {}, {}
    text_to_image = RadsynthTextToImagePipeline.from_pipe(pipeline)
    for name in ("from_maps", "text_only"):
        images, start = [], time.perf_counter()
        for first in range(0, len(prompts), config.sampling.batch_size):
            rows = slice(first, first + config.sampling.batch_size)
            generators = [torch.Generator().manual_seed(config.runtime.seed + i)
                          for i in range(first, min(first + config.sampling.batch_size, len(prompts)))]
            steered = ({"label_maps": maps[rows], "conditioning_scale": config.controlnet.conditioning_scale}
                       if name == "from_maps" else {})
            output = (pipeline if steered else text_to_image)(
                prompts[rows], generator=generators, num_inference_steps=config.sampling.num_inference_steps,
                **steered, **config.sampling.guidance)
            images.append(np.asarray(output.images)[:, 0])
        seconds[name] = (time.perf_counter() - start) / len(prompts)
        predicted = segmenter.predict(np.concatenate(images))
        dice[name] = per_label_dice(predicted, masks, labels)
        if lesion is not None:
            found = (predicted == lesion).reshape(len(predicted), -1).sum(1) * voxel
            sizes[f"found_in_images_{name}"] = float(np.median(found))
            sizes[f"share_of_images_with_it_found_{name}"] = float(np.mean(found > 0))

    def per_label(scores: np.ndarray) -> dict[str, float]:
        return {label_names[label]: round(float(np.nanmean(scores[:, j])), 4) for j, label in enumerate(labels)}

    generated = None
    if config.mask_generator.enabled:  # pairs from text alone: the mask generator draws each map
        pair_pipeline = RadsynthTextToPairPipeline.from_model_dir(model_dir(config))
        pair_pipeline.set_progress_bar_config(disable=True)
        base_prompts = [conditioning.prompt(record) for record in records]
        lesions = [args.lesion] if args.lesion else []
        maps, images, edits, start = [], [], [], time.perf_counter()
        for first in range(0, len(prompts), config.sampling.batch_size):
            rows = range(first, min(first + config.sampling.batch_size, len(prompts)))
            output = pair_pipeline([prompts[i] if lesions else base_prompts[i] for i in rows], lesions=lesions,
                                   generator=[torch.Generator().manual_seed(config.runtime.seed + i) for i in rows],
                                   num_inference_steps=config.sampling.num_inference_steps,
                                   mask_guidance_scale=config.sampling.mask_guidance_scale,
                                   conditioning_scale=config.controlnet.conditioning_scale, **config.sampling.guidance)
            maps.append(output.label_maps[:, 0])
            images.append(np.asarray(output.images)[:, 0])
            edits += [record for records in output.lesions for record in records]
        seconds["generated_pairs"] = (time.perf_counter() - start) / len(prompts)
        maps, predicted = np.concatenate(maps), segmenter.predict(np.concatenate(images))
        # How much of each map a label covers, generated vs the real test maps: are the drawn maps plausible?
        share = {label_names[label]: {"generated": round(float((maps == label).mean()), 4),
                                      "real_test": round(float((test_set.masks == label).mean()), 4)}
                 for label in labels}
        generated = {"dice": per_label(per_label_dice(predicted, maps, labels)), "label_share": share,
                     "seconds_per_pair": round(seconds["generated_pairs"], 3),
                     "mask_generator_steps": config.mask_generator.max_steps,
                     "mask_guidance_scale": config.sampling.mask_guidance_scale}
        if lesion is not None:
            found = (predicted == lesion).reshape(len(predicted), -1).sum(1) * voxel
            generated["lesion"] = {"requested": float(np.median([e.get("requested_volume") for e in edits])),
                                   "in_generated_maps": float(np.median([e["achieved_volume"] for e in edits])),
                                   "found_in_images": float(np.median(found)),
                                   "share_of_images_with_it_found": float(np.mean(found > 0))}

    report = {
        "config": args.config, "overrides": args.overrides, "n_pairs": len(prompts),
        "mask_input": config.conditioning.mask_input, "diffusion_steps": config.diffusion.max_steps,
        "controlnet_steps": config.controlnet.max_steps if config.conditioning.mask_input == "controlnet" else None,
        "dice_real_test_ceiling": per_label(ceiling),
        "dice_autoencoder_reconstructions": per_label(autoencoder),
        "dice_generated_from_maps": per_label(dice["from_maps"]),
        "dice_generated_text_only": per_label(dice["text_only"]),
        "lesion": {"request": args.lesion, **sizes} if lesion is not None else None,
        "generated_masks": generated,
        "seconds_per_pair": round(seconds["from_maps"], 3), "seconds_per_image_text_only": round(seconds["text_only"], 3),
        "train_seconds": round(train_seconds, 1),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
    }
    print(json.dumps(report))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()

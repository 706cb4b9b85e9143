"""Image + label-map pairs: `radsynth generate --pairs` on a tiny ControlNet model, with a lesion edit."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image as PILImage
from safetensors.torch import load_file
from scipy import ndimage

from radsynth.configs import UserInputError
from radsynth.generators.trainer import read_metrics
from radsynth.pipelines.data.ingest import ingest
from radsynth.pipelines.data.manifest import read_manifest
from radsynth.pipelines.training import train

from .test_flows import radsynth
from .test_training_stage import config_file, tiny_config

MASKS = ["diffusion.max_steps=2", "conditioning.use_masks=true", "controlnet.max_steps=2", "controlnet.batch_size=4",
         "controlnet.segmenter_steps=5"]


def trained_build(tmp_path, *overrides):
    """A tiny build ingested and trained with ``overrides``; returns its run folder and config file."""
    run_dir = tmp_path / "run"
    config = tiny_config(run_dir, *overrides)
    ingest(config, progress=False)
    train(config, progress=False)
    return run_dir, config_file(tmp_path, run_dir, *overrides)


def test_pairs_share_the_image_grid_carry_the_requested_lesion_and_say_where_the_mask_came_from(tmp_path):
    run_dir, path = trained_build(tmp_path, *MASKS)
    request = "nodule 30 mm in right lung"
    done = radsynth("generate", str(path), "--pairs", "--n", "3", "--lesion", request, "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["written"] == 3

    train_ids = {r.case_id for r in read_manifest(run_dir / "data" / "manifest.jsonl") if r.split == "train"}
    for sidecar_path in sorted((run_dir / "samples").glob("syn_*.json")):
        sidecar = json.loads(sidecar_path.read_text())
        image = np.asarray(PILImage.open(sidecar_path.with_name(sidecar["file"])))
        label = np.asarray(PILImage.open(sidecar_path.with_name(sidecar["label_file"])))
        assert image.shape == label.shape == (32, 32) and image.dtype == np.uint16 and label.dtype.kind in "ui"
        names = {int(value): name for value, name in sidecar["label_names"].items()}
        assert set(np.unique(label)) <= set(names)
        nodule = next(value for value, name in names.items() if name == "nodule")
        edit = sidecar["lesions"][0]
        # The inserted nodule is in the label file (the source mask may already have had one of its own).
        assert label[tuple(edit["centre_voxel"])] == nodule and (label == nodule).sum() >= edit["voxel_count"] > 0
        assert abs(edit["achieved_volume"] - edit["requested_volume"]) <= np.prod(sidecar["spacing"])  # one pixel
        assert sidecar["mask_source"] == "edited" and sidecar["derived_from_real"] is True
        assert sidecar["mask"]["source_case_id"] in train_ids and request in sidecar["prompt"]

    again = radsynth("generate", str(path), "--pairs", "--n", "3", "--lesion", request, "--json")
    assert json.loads(again.stdout.strip().splitlines()[-1])["skipped"] == 3  # resumable, like plain samples


def test_pairs_need_a_mask_model_and_lesions_need_pairs(tmp_path):
    run_dir, path = trained_build(tmp_path, "diffusion.max_steps=2")
    no_controlnet = radsynth("generate", str(path), "--pairs", "--n", "1")
    assert no_controlnet.returncode == 2 and "use_masks" in no_controlnet.stderr.strip().splitlines()[-1]
    lesion_alone = radsynth("generate", str(path), "--lesion", "nodule 8 mm", "--n", "1")
    assert lesion_alone.returncode == 2 and "--pairs" in lesion_alone.stderr.strip().splitlines()[-1]
    assert not (run_dir / "samples").exists() or not any((run_dir / "samples").iterdir())  # nothing half-written


GENERATED = [*MASKS, "mask_generator.enabled=true", "mask_generator.max_steps=3", "mask_generator.batch_size=4",
             "mask_generator.channels=[16,32]", "mask_generator.attention_levels=[false,true]"]


def test_generated_masks_train_with_the_model_and_make_pairs_that_owe_nothing_to_a_real_case(tmp_path):
    run_dir = tmp_path / "run"
    config = tiny_config(run_dir, *GENERATED)
    ingest(config, progress=False)
    first = train(config, progress=False)
    assert (first.model_dir / "mask_generator" / "config.json").is_file()
    steps = read_metrics(run_dir / "train" / "mask_generator" / "metrics.csv", "loss")
    assert sorted(steps) == [1, 2, 3]
    # Turning the generator on neither retrained the base nor the ControlNet; a rerun trains nothing.
    assert train(config, progress=False).model_hash == first.model_hash
    assert read_metrics(run_dir / "train" / "mask_generator" / "metrics.csv", "loss") == steps

    # null: the maps take the images' guidance (the demo config sets its own).
    path = config_file(tmp_path, run_dir, *GENERATED, "sampling.mask_source=generated", "sampling.mask_guidance_scale=null")
    request = "nodule 30 mm in right lung"
    done = radsynth("generate", str(path), "--pairs", "--n", "2", "--lesion", request, "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    for sidecar_path in sorted((run_dir / "samples").glob("syn_*.json")):
        sidecar = json.loads(sidecar_path.read_text())
        image = np.asarray(PILImage.open(sidecar_path.with_name(sidecar["file"])))
        label = np.asarray(PILImage.open(sidecar_path.with_name(sidecar["label_file"])))
        assert image.shape == label.shape == (32, 32)
        assert sidecar["mask"] == {"mask_source": "generated", "derived_from_real": False}
        assert sidecar["derived_from_real"] is False and sidecar["mask_source"] == "edited"
        nodule = next(int(value) for value, name in sidecar["label_names"].items() if name == "nodule")
        assert label[tuple(sidecar["lesions"][0]["centre_voxel"])] == nodule and request in sidecar["prompt"]
        assert "mask_guidance_scale" not in sidecar  # the maps had the images' guidance
    # The maps' own guidance is part of how a pair was drawn: it keys the seed and the sidecar says it.
    path = config_file(tmp_path, run_dir, *GENERATED, "sampling.mask_source=generated",
                       "sampling.mask_guidance_scale=1.0")
    done = radsynth("generate", str(path), "--pairs", "--n", "1", "--lesion", request, "--out",
                    str(tmp_path / "unguided"), "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    first, unguided = (json.loads((folder / "syn_000000.json").read_text())
                       for folder in (run_dir / "samples", tmp_path / "unguided"))
    assert unguided["mask_guidance_scale"] == 1.0 and unguided["guidance_scale"] == first["guidance_scale"]
    assert unguided["seed"] != first["seed"]


def test_generated_masks_need_the_mask_generator(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(UserInputError, match="mask_generator.enabled"):
        tiny_config(run_dir, *MASKS, "sampling.mask_source=generated")
    with pytest.raises(UserInputError, match="conditioning.use_masks"):
        tiny_config(run_dir, "mask_generator.enabled=true")


def test_inpainted_pairs_keep_the_real_training_image_outside_the_lesion_and_say_whose_it_is(tmp_path):
    run_dir, path = trained_build(tmp_path, *MASKS)
    request = "nodule 40 mm2 in left lung"
    done = radsynth("generate", str(path), "--pairs", "--inpaint", "--n", "2", "--lesion", request, "--json")
    assert done.returncode == 0, done.stderr[-2000:]

    cache = next((run_dir / "data" / "cache").iterdir())
    train_ids = {r.case_id for r in read_manifest(run_dir / "data" / "manifest.jsonl") if r.split == "train"}
    for sidecar_path in sorted((run_dir / "samples").glob("syn_*.json")):
        sidecar = json.loads(sidecar_path.read_text())
        source = sidecar["mask"]["source_case_id"]
        assert source in train_ids and sidecar["inpainting"]["background_case_id"] == source
        assert sidecar["derived_from_real"] is True and sidecar["mask"]["augmentations"] == []
        cached = load_file(str(cache / f"{source}.safetensors"))
        real, real_label = cached["image"].numpy().reshape(32, 32), cached["label"].numpy().reshape(32, 32)
        image = np.asarray(PILImage.open(sidecar_path.with_name(sidecar["file"]))).astype(np.int64)
        label = np.asarray(PILImage.open(sidecar_path.with_name(sidecar["label_file"])))
        region = label != real_label  # the edit: the case's own map, with the nodule written in
        assert region.sum() == sidecar["inpainting"]["region_voxels"] > 0
        grown = ndimage.binary_dilation(region, iterations=2)  # sampling.inpaint_margin, 4-connected
        expected = np.round((real + 1) / 2 * 65535)  # the real image as png16 writes it (png range = training range)
        assert np.abs(image[~grown] - expected[~grown]).max() <= 1
        assert np.abs(image[region] - expected[region]).mean() > 100  # new content where the nodule is


def test_inpainting_needs_pairs_and_a_lesion(tmp_path):
    run_dir = tmp_path / "run"
    path = config_file(tmp_path, run_dir, *MASKS)
    alone = radsynth("generate", str(path), "--inpaint", "--n", "1")
    assert alone.returncode == 2 and "--lesion" in alone.stderr.strip().splitlines()[-1]
    with pytest.raises(UserInputError, match="sampling.inpaint"):
        tiny_config(run_dir, *MASKS, "sampling.inpaint=true")

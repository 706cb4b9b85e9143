"""Image sets for scoring from plain folders and from sample folders; the scorecard's files; CLI bad input."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from radsynth.configs import UserInputError
from radsynth.flows.cli import main
from radsynth.pipelines.data.io import write_nifti, write_png
from radsynth.pipelines.data.preprocess import IntensityMap
from radsynth.pipelines.sampling.writers import write_sample
from radsynth.pipelines.scoring.bootstrap import Estimate
from radsynth.pipelines.scoring.image_sets import ImageSet
from radsynth.pipelines.scoring.loading import folder_set, sample_set
from radsynth.pipelines.scoring.scorecard import Scorecard

from .conftest import blob_volume


def write_png_folder(root, n=6, shape=(32, 32), seed=0, masks=True, metadata=True):
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(n):
        image, label = blob_volume(rng, shape)
        write_png(root / f"im{index}.png", np.clip(image * 100, 0, 65535).astype(np.uint16))
        if masks:
            write_png(root / "labels" / f"im{index}.png", label)
        rows.append({"file": f"im{index}.png", "patient_id": f"p{index // 2}", "finding": "a" if index % 2 else "b"})
    if metadata:
        with (root / "metadata.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return root


def test_folder_set_reads_images_masks_patients_and_attributes_onto_the_reference_grid(tmp_path):
    train = folder_set(write_png_folder(tmp_path / "train"), "train", is_synthetic=False)
    assert train.images.shape == (6, 32, 32) and train.masks.shape == (6, 32, 32)
    assert train.images.min() >= -1 and train.images.max() <= 1 and train.images.std() > 0.1
    assert train.groups == ["p0", "p0", "p1", "p1", "p2", "p2"]
    assert train.conditions[0] == {"finding": "b"} and train.conditions[1] == {"finding": "a"}
    assert set(np.unique(train.masks)) == {0, 1, 2}

    other = folder_set(write_png_folder(tmp_path / "other", shape=(48, 40), metadata=False), "other",
                       is_synthetic=True, reference=train)
    assert other.images.shape == (6, 32, 32) and other.masks.dtype == np.int64
    assert set(np.unique(other.masks)) <= {0, 1, 2}
    assert other.groups == other.ids  # no metadata: each image is its own patient
    assert other.intensity == train.intensity


def test_sample_set_maps_png16_back_to_physical_units_and_reads_conditions(tmp_path):
    intensity = IntensityMap("ct_window", -1000.0, 1000.0)
    reference = ImageSet(np.zeros((2, 16, 16), np.float32), ["a", "b"], ["p", "q"], (1.0, 1.0), intensity, False)
    physical = np.linspace(-500, 500, 256).reshape(16, 16)
    sidecar = {"prompt": "finding: nodule; sex: F. text", "seed": 1, "scheduler": "ddim", "num_inference_steps": 2,
               "guidance_scale": 1.0, "model_hash": "x"}
    write_sample(tmp_path, "syn_000000", physical, (1.0, 1.0), "png16", sidecar, png_range=(-1000, 1000))
    write_sample(tmp_path, "syn_000001", physical, (1.0, 1.0), "nifti", sidecar)
    samples = sample_set(tmp_path, reference)
    assert samples.ids == ["syn_000000", "syn_000001"] and samples.groups == samples.ids
    np.testing.assert_allclose(samples.physical()[0], physical, atol=0.1)  # 16-bit quantisation of 2000 HU
    np.testing.assert_allclose(samples.physical()[1], physical, atol=1e-3)
    assert samples.conditions[0] == {"finding": "nodule", "sex": "F"}


@pytest.mark.parametrize("fmt", ["png16", "nifti"])
def test_a_pairs_label_map_is_its_mask_and_never_a_sample_of_its_own(tmp_path, fmt):
    intensity = IntensityMap("ct_window", -1000.0, 1000.0)
    reference = ImageSet(np.zeros((2, 16, 16), np.float32), ["a", "b"], ["p", "q"], (1.0, 1.0), intensity, False)
    rng = np.random.default_rng(0)
    sidecar = {"prompt": "p", "seed": 1, "scheduler": "ddim", "num_inference_steps": 2, "guidance_scale": 1.0,
               "model_hash": "x"}
    labels = [rng.integers(0, 3, (16, 16)) for _ in range(3)]
    for index, label in enumerate(labels):
        write_sample(tmp_path, f"syn_{index:06d}", rng.normal(0, 300, (16, 16)), (1.0, 1.0), fmt, sidecar,
                     png_range=(-1000, 1000), label=label)
    samples = sample_set(tmp_path, reference)
    assert samples.ids == ["syn_000000", "syn_000001", "syn_000002"] and len(samples.images) == 3
    np.testing.assert_array_equal(samples.masks, np.stack(labels))

    (tmp_path / f"syn_000002_label{'.png' if fmt == 'png16' else '.nii.gz'}").unlink()
    with pytest.raises(UserInputError, match="label map named in the sample's sidecar is missing"):
        sample_set(tmp_path, reference)
    write_sample(tmp_path, "syn_000002", rng.normal(0, 300, (16, 16)), (1.0, 1.0), fmt, sidecar,
                 png_range=(-1000, 1000))  # rewritten without its label map: a folder half pairs
    with pytest.raises(UserInputError, match="2 of 3 samples have a label map"):
        sample_set(tmp_path, reference)


def test_a_set_above_the_memory_setting_is_held_on_disk_with_the_same_values_and_leaves_no_file(tmp_path,
                                                                                             monkeypatch):
    intensity = IntensityMap("ct_window", -1000.0, 1000.0)
    reference = ImageSet(np.zeros((2, 16, 16), np.float32), ["a", "b"], ["p", "q"], (1.0, 1.0), intensity, False)
    rng = np.random.default_rng(0)
    sidecar = {"prompt": "p", "seed": 1, "scheduler": "ddim", "num_inference_steps": 2, "guidance_scale": 1.0,
               "model_hash": "x"}
    for index in range(5):
        write_sample(tmp_path / "samples", f"syn_{index:06d}", rng.normal(0, 300, (16, 16)), (1.0, 1.0), "nifti",
                     sidecar, label=rng.integers(0, 3, (16, 16)))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    in_memory = sample_set(tmp_path / "samples", reference, memory_mb=1.0)  # 5 x 16 x 16 x 12 bytes: 15 kB
    on_disk = sample_set(tmp_path / "samples", reference, memory_mb=0.01)
    assert not isinstance(in_memory.images, np.memmap) and not isinstance(in_memory.masks, np.memmap)
    assert isinstance(on_disk.images, np.memmap) and isinstance(on_disk.masks, np.memmap)
    np.testing.assert_array_equal(on_disk.images, in_memory.images)
    np.testing.assert_array_equal(on_disk.masks, in_memory.masks)
    assert list(scratch.iterdir()) == []  # the files are anonymous: nothing to clean up, even after a crash
    first = sample_set(tmp_path / "samples", reference, max_samples=3, memory_mb=0)
    assert first.ids == in_memory.ids[:3] and isinstance(first.images, np.memmap)
    np.testing.assert_array_equal(first.images, in_memory.images[:3])

    train = folder_set(write_png_folder(tmp_path / "train"), "train", is_synthetic=False)
    other = write_png_folder(tmp_path / "other", seed=1)
    held = folder_set(other, "synthetic", is_synthetic=True, reference=train, memory_mb=0)
    kept = folder_set(other, "synthetic", is_synthetic=True, reference=train)
    assert isinstance(held.images, np.memmap) and not isinstance(kept.images, np.memmap)
    np.testing.assert_array_equal(held.images, kept.images)
    np.testing.assert_array_equal(held.masks, kept.masks)


def test_mask_folder_with_a_missing_or_non_integer_mask_is_a_user_error(tmp_path):
    folder = write_png_folder(tmp_path / "train")
    (folder / "labels" / "im3.png").unlink()
    with pytest.raises(UserInputError, match="no mask for image 'im3.png'"):
        folder_set(folder, "train", is_synthetic=False)
    folder = tmp_path / "vol"
    write_nifti(folder / "a.nii.gz", np.arange(64, dtype=np.float32).reshape(4, 4, 4), np.eye(4))
    write_nifti(folder / "labels" / "a.nii.gz", np.full((4, 4, 4), 0.5, np.float32), np.eye(4))
    with pytest.raises(UserInputError, match="non-integer"):
        folder_set(folder, "train", is_synthetic=False)


def test_scorecard_writes_json_markdown_and_per_sample_csv(tmp_path):
    card = Scorecard(sizes={"synthetic": 2})
    card.add("realism", "frechet_distance", Estimate(1.5, 1.0, 2.0, 0.25, 200), feature_space="radiomics",
             reference=Estimate(0.5, 0.2, 0.9, 0.1, 200), reference_name="real vs real", n=2, better="lower")
    card.add("privacy", "copy_rate", float("nan"), n=2)
    card.per_sample = [{"sample_id": "s0", "flagged": True, "d": 0.5}, {"sample_id": "s1", "flagged": False}]
    card.verdicts["privacy"] = {"passed": False, "reasons": ["copy rate 0.5 above 0.02"]}
    paths = card.write(tmp_path)
    saved = json.loads(paths["json"].read_text())
    assert saved["rows"][0]["value"] == 1.5 and saved["rows"][0]["reference_ci_high"] == 0.9
    assert saved["rows"][1]["value"] is None  # NaN is not JSON: written as null
    assert saved["flagged_samples"] == 1 and "torch" in saved["software"]
    markdown = paths["markdown"].read_text()
    assert "1.5 (1 to 2)" in markdown and "privacy: FAIL" in markdown and "copy rate 0.5 above 0.02" in markdown
    rows = list(csv.DictReader(paths["per_sample"].open()))
    assert rows[0] == {"sample_id": "s0", "flagged": "1", "d": "0.5"} and rows[1]["d"] == ""


@pytest.mark.parametrize("problem", ["empty", "missing", "override", "shape"])
def test_score_cli_bad_input_is_one_line_and_exit_2_with_nothing_written(tmp_path, capsys, problem):
    train = write_png_folder(tmp_path / "train")
    holdout = write_png_folder(tmp_path / "holdout", seed=1)
    synthetic = tmp_path / "synthetic"
    synthetic.mkdir()
    extra = []
    if problem == "missing":
        synthetic = tmp_path / "nowhere"
    elif problem == "override":
        write_png_folder(synthetic, seed=2)
        extra = ["scoring.bootstrap_samples=3"]
    elif problem == "shape":
        write_nifti(synthetic / "a.nii.gz", np.ones((8, 8, 8), np.float32), np.eye(4))
    out = tmp_path / "out"
    code = main(["score", "--synthetic", str(synthetic), "--train", str(train), "--holdout", str(holdout),
                 "--out", str(out), *extra])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1 and error[0].startswith("radsynth: error:")
    assert {"empty": "no images", "missing": "not a folder", "override": "bootstrap_samples",
            "shape": "3D image among 2D"}[problem] in error[0]
    assert not out.exists()

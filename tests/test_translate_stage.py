"""``radsynth translate``: a folder of CT phantoms through a tiny CT+MRI model (diffusion bridge with its ControlNet,
and the CycleGAN baseline), written as derived-from-real pairs that carry the source's labels; bad inputs exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from radsynth.configs import load_config
from radsynth.flows.cli import main
from radsynth.pipelines.data.adapters.phantom import write_msd_folder
from radsynth.pipelines.data.ingest import ingest
from radsynth.pipelines.data.io import read_image, write_nifti
from radsynth.pipelines.data.phantoms import kind_module
from radsynth.pipelines.sampling.sidecar import read_sidecar
from radsynth.pipelines.training import train

SHAPE = [24, 24, 24]
TINY = {"autoencoder": {"channels": [8, 16, 16], "norm_num_groups": 8, "max_steps": 4, "batch_size": 2},
        "diffusion": {"channels": [8, 16], "attention_levels": [False, True], "norm_num_groups": 8,
                      "num_head_channels": 8, "max_steps": 4, "batch_size": 2, "warmup_steps": 2, "validate_every": 100},
        "controlnet": {"max_steps": 2, "batch_size": 2, "validate_every": None},
        "conditioning": {"embed_dim": 16},
        "translation": {"num_inference_steps": 4, "batch_size": 2,
                        "cycle_gan": {"channels": [8, 16], "max_steps": 3, "batch_size": 2}}}


def _merged(base: dict, extra: dict) -> dict:
    return {key: _merged(base.get(key, {}), value) if isinstance(value, dict) else value
            for key, value in {**base, **extra}.items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny CT+MRI model trained on 14 + 14 unpaired phantoms, its config file, and an MSD folder of 3 CT cases."""
    folder = tmp_path_factory.mktemp("translate")
    preset = yaml.safe_load(_preset_path().read_text())
    for source in preset["data"]["sources"]:
        source["phantom"].update(n_cases=14, shape=SHAPE)  # enough patients for a test split of each
    preset["data"]["preprocess"]["target_shape"] = SHAPE
    path, config = _train_tiny(preset, folder)
    return path, config, write_phantom_msd(folder / "ct_source", "ct_torso")


def _train_tiny(preset: dict, folder) -> tuple:
    """``preset`` at TINY's sizes written to ``folder``/config.yaml, ingested and trained: (its path, its config)."""
    preset = _merged(preset, {**TINY, "runtime": {"output_dir": str(folder / "run"), "device": "cpu"}})
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(preset))
    config = load_config(str(path))
    ingest(config, progress=False)
    train(config, progress=False)
    return path, config


def _preset_path():
    from radsynth.configs import preset_path
    return preset_path("translate-abdomen")


def write_phantom_msd(root, kind: str, n_cases: int = 3, seed: int = 7):
    """An MSD folder of phantoms under the CT cases' ids: for mri_torso, the paired truth of translating them."""
    return write_msd_folder(root, kind, n_cases, seed, SHAPE, ids_of="ct_torso")


@pytest.mark.parametrize("method", ["diffusion", "cycle_gan"])
def test_translated_cases_are_pairs_carrying_the_source_labels_marked_derived_from_real(trained, tmp_path, method):
    path, _, source = trained
    out = tmp_path / method
    code = main(["translate", str(path), f"translation.method={method}", "--from", "ct", "--to", "mri",
                 "--source", str(source), "--out", str(out), "--json"])
    assert code == 0
    sidecars = sorted(out.glob("*.json"))
    assert len(sidecars) == 3
    for sidecar_path in sidecars:
        sidecar = read_sidecar(sidecar_path)
        extra = sidecar.model_extra
        assert sidecar.derived_from_real and extra["source_case"].startswith("phantom_ct_")
        assert extra["translation"]["method"] == method and extra["translation"]["from"] == "ct"
        assert sidecar.conditions["modality"] == "mri" and extra["modality"] == "mri"
        source_label = read_image(source / "labelsTr" / f"{extra['source_case']}.nii.gz").array
        carried = read_image(out / sidecar.label_file).array
        image = read_image(out / sidecar.file).array
        assert carried.shape == image.shape == tuple(SHAPE)
        np.testing.assert_array_equal(carried, source_label)  # the phantom vocabulary is the model's: carried as is
        assert np.isfinite(image).all() and image.std() > 0


def test_a_rerun_on_a_source_folder_that_lost_cases_leaves_only_its_own_translations(trained, tmp_path):
    path, _, source = trained
    out = tmp_path / "out"
    arguments = ["translate", str(path), "translation.method=cycle_gan", "--from", "ct", "--to", "mri", "--out", str(out)]
    assert main([*arguments, "--source", str(source)]) == 0
    fewer = write_phantom_msd(tmp_path / "fewer", "ct_torso", n_cases=2)
    assert main([*arguments, "--source", str(fewer)]) == 0
    kept = {read_sidecar(sidecar).model_extra["source_case"] for sidecar in out.glob("*.json")}
    assert kept == {path.name.removesuffix(".nii.gz") for path in (fewer / "imagesTr").iterdir()} and len(kept) == 2
    assert len([path for path in out.iterdir() if not path.name.startswith(".")]) == 2 * 3  # sidecar, image, label


def test_the_target_prompt_names_the_region_the_model_learnt_the_target_modality_at():
    from radsynth.pipelines.data.manifest import CaseRecord
    from radsynth.pipelines.translation import target_attributes

    record = CaseRecord(case_id="c1", patient_id="p1", modality="ct", body_region="thorax_abdomen", image="c1.nii.gz",
                        spacing=(1.0, 1.0, 1.0), shape=(8, 8, 8), source="s", sha256="0" * 64,
                        attributes={"modality": "ct", "body_region": "thorax_abdomen", "finding": "none"})
    assert target_attributes(record, "mri", "abdomen") == {"modality": "mri", "body_region": "abdomen",
                                                           "finding": "none"}
    assert target_attributes(record, "mri", None)["body_region"] == "thorax_abdomen"  # no single region learnt
    without = record.model_copy(update={"attributes": {"modality": "ct"}})  # region not conditioned on: not added
    assert target_attributes(without, "mri", "abdomen") == {"modality": "mri"}


TINY_SCORING = ["scoring.feature_spaces=[random_cnn,radiomics]", "scoring.segmenter_steps=2", "scoring.classifier_steps=2",
                "scoring.utility=false", "scoring.membership_samples=4", "scoring.membership_timesteps=1",
                "scoring.bootstrap_samples=10", "scoring.min_stratum_size=2"]


@pytest.mark.slow
def test_translations_are_scored_against_the_target_modality_and_their_paired_truth(trained, tmp_path):
    path, config, source = trained
    out, truth = tmp_path / "mri", write_phantom_msd(tmp_path / "truth", "mri_torso")
    assert main(["translate", str(path), "--from", "ct", "--to", "mri", "--source", str(source), "--out", str(out),
                 "--json"]) == 0
    scoring = [*TINY_SCORING, "scoring.modality=mri", f"scoring.paired_truth={truth}"]
    assert main(["evaluate", str(path), *scoring, "--samples", str(out), "--out", str(tmp_path / "eval"), "--json"]) == 0
    card = json.loads((tmp_path / "eval" / "scorecard.json").read_text())
    mri_train = sum(1 for line in (config.output_dir / "data" / "manifest.jsonl").read_text().splitlines()
                    if '"split":"train"' in line.replace(" ", "") and '"modality":"mri"' in line.replace(" ", ""))
    assert card["sizes"]["train"] == mri_train and card["sizes"]["synthetic"] == 3  # real side: MRI cases only
    rows = {(row["section"], row["metric"]): row for row in card["rows"]}
    for metric in ("pixel_truth_ssim", "pixel_truth_psnr"):
        row = rows[("translation", metric)]
        assert row["ci_low"] <= row["value"] <= row["ci_high"] and row["n"] == 3
    assert ("adherence", "mask_dice_ratio") in rows  # label preservation: carried labels against the real segmenter
    # Privacy is read against the CT training patients the translations could have come from, too.
    strata = {(row["metric"], row["stratum"]) for row in card["rows"] if row["section"] == "privacy"}
    assert {("copy_rate", "source modality=ct"), ("dcr_share", "source modality=ct")} <= strata
    assert card["sizes"]["holdout [source modality=ct]"] > 0
    assert any(row["metric"] == "membership_inference_auc" for row in card["rows"])  # the model made them: probed

    partial = tmp_path / "partial"
    write_phantom_msd(partial, "mri_torso", n_cases=2)
    assert main(["evaluate", str(path), *TINY_SCORING, "scoring.modality=mri", f"scoring.paired_truth={partial}",
                 "--samples", str(out), "--out", str(tmp_path / "eval2")]) == 2


@pytest.mark.slow
def test_the_cycle_gans_translations_are_not_probed_with_the_diffusion_models_white_box_attacks(trained, tmp_path):
    path, _, source = trained
    out = tmp_path / "cycle_gan"
    assert main(["translate", str(path), "translation.method=cycle_gan", "--from", "ct", "--to", "mri", "--source",
                 str(source), "--out", str(out), "--json"]) == 0
    # No --model: the build's diffusion model is there, but it did not make these samples.
    assert main(["evaluate", str(path), *TINY_SCORING, "scoring.modality=mri", "--samples", str(out), "--out",
                 str(tmp_path / "eval"), "--json"]) == 0
    card = json.loads((tmp_path / "eval" / "scorecard.json").read_text())
    assert not any(row["metric"].startswith("membership_inference") for row in card["rows"])
    assert any(note.startswith("membership inference: not run") for note in card["notes"])
    assert any(row["stratum"] == "source modality=ct" for row in card["rows"])


@pytest.mark.slow  # a Prefect server start
def test_the_flow_runs_the_stage_and_a_second_run_comes_from_its_cache(trained, tmp_path, prefect_server):
    from radsynth.flows.stages import translate_flow

    path, config, source = trained
    first = translate_flow(config, str(source), "ct", "mri", sample_dir=str(tmp_path / "flow"))
    again = translate_flow(config, str(source), "ct", "mri", sample_dir=str(tmp_path / "flow"))
    assert first["tasks"] == {"translate": "Completed"} and again["tasks"] == {"translate": "Cached"}
    assert first["written"] == 3 and (tmp_path / "flow" / "tr_phantom_ct_00001.json").is_file()
    # Another source folder into the same folder replaces its translations; the first folder's cached result
    # then points at samples that are gone, so asking for it again translates again.
    fewer = write_phantom_msd(tmp_path / "fewer", "ct_torso", n_cases=2)
    translate_flow(config, str(fewer), "ct", "mri", sample_dir=str(tmp_path / "flow"))
    third = translate_flow(config, str(source), "ct", "mri", sample_dir=str(tmp_path / "flow"))
    assert third["tasks"] == {"translate": "Completed"} and len(list((tmp_path / "flow").glob("*.json"))) == 3


@pytest.mark.parametrize(("arguments", "message"), [
    (["--from", "pet", "--to", "mri"], "--from: unknown modality 'pet'"),
    (["--from", "ct", "--to", "ct"], "--to: the same modality as --from"),
    (["--from", "mri", "--to", "ct"], "holds ct images"),           # the folder is CT, not the --from MRI
    (["--from", "ct", "--to", "xray"], "trained on ct+mri only, not on xray"),  # no model for the target
])
def test_bad_translate_requests_are_one_line_and_exit_2(trained, tmp_path, capsys, arguments, message):
    path, _, source = trained
    out = tmp_path / "out"
    code = main(["translate", str(path), *arguments, "--source", str(source), "--out", str(out)])
    error = capsys.readouterr().err.strip()
    assert code == 2 and message in error and len(error.splitlines()) == 1
    assert not out.exists()  # nothing half-written


def test_a_source_folder_of_another_dimension_or_without_dataset_json_is_refused(trained, tmp_path, capsys):
    path, _, _ = trained
    flat = tmp_path / "flat"
    write_nifti(flat / "imagesTr" / "case.nii.gz", np.zeros((24, 24), np.float32), np.eye(4))
    (flat / "dataset.json").write_text(json.dumps({"modality": {"0": "CT"}, "labels": {"0": "background"}}))
    assert main(["translate", str(path), "--from", "ct", "--to", "mri", "--source", str(flat)]) == 2
    assert "a 2D image" in capsys.readouterr().err
    assert main(["translate", str(path), "--from", "ct", "--to", "mri", "--source", str(tmp_path)]) == 2
    assert "no dataset.json" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained_2d(tmp_path_factory):
    """A tiny 2D CT+MRI model trained on the abdominal slices of 14 + 14 unpaired torso phantoms (2D NIfTI, as
    nnU-Net's 2D datasets and radsynth's own 2D CT / MRI releases store them)."""
    folder = tmp_path_factory.mktemp("translate2d")
    sources = [{"name": modality, "format": "msd", "body_region": "abdomen",
                "root": str(write_msd_folder(folder / modality, kind, 14, seed, SHAPE, axial_slice=True))}
               for modality, kind, seed in (("ct", "ct_torso", 0), ("mri", "mri_torso", 1))]
    preset = yaml.safe_load(_preset_path().read_text())
    preset["data"].update(sources=sources, label_names=kind_module("ct_torso").LABEL_NAMES)
    preset["data"]["preprocess"]["target_shape"] = SHAPE[:2]
    preset["conditioning"]["attributes"] = ["modality"]  # an MSD folder records no finding
    path, _ = _train_tiny(preset, folder)
    return path, write_msd_folder(folder / "ct_source", "ct_torso", 3, 7, SHAPE, axial_slice=True)


@pytest.mark.parametrize("method", ["diffusion", "cycle_gan"])
def test_a_2d_model_translates_a_folder_of_slices_into_image_and_label_pairs(trained_2d, tmp_path, method):
    path, source = trained_2d
    out = tmp_path / method
    assert main(["translate", str(path), f"translation.method={method}", "--from", "ct", "--to", "mri", "--source",
                 str(source), "--out", str(out), "--json"]) == 0
    sidecars = [read_sidecar(p) for p in sorted(out.glob("*.json"))]
    assert len(sidecars) == 3
    for sidecar in sidecars:
        image, label = read_image(out / sidecar.file).array, read_image(out / sidecar.label_file).array
        assert sidecar.file.endswith(".png") and image.shape == label.shape == tuple(SHAPE[:2])
        truth = read_image(source / "labelsTr" / f"{sidecar.model_extra['source_case']}.nii.gz").array
        np.testing.assert_array_equal(label, truth)
        assert sidecar.derived_from_real and sidecar.conditions["modality"] == "mri"
    # A 3D folder is not what a 2D model translates.
    volumes = write_msd_folder(tmp_path / "volumes", "ct_torso", 1, 7, SHAPE)
    assert main(["translate", str(path), "--from", "ct", "--to", "mri", "--source", str(volumes)]) == 2


def test_the_console_script_answers_translate_help():
    done = subprocess.run([sys.executable, "-m", "radsynth.flows.cli", "translate", "--help"], capture_output=True,
                          text=True, check=True)
    assert "--source" in done.stdout and "--from" in done.stdout

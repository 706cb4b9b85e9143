"""The release stage end to end on a tiny real build (train, generate, evaluate, release through the CLI): a
published version with card, report and formats; the same build twice is a no-op; planted copies are refused
with a report; a release killed at any point leaves the previous version or the new one; bad input is one line."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from radsynth.configs import load_config
from radsynth.flows.cli import GATE_REFUSED_EXIT, main
from radsynth.pipelines.release.gate import GateResult
from radsynth.pipelines.release.publish import latest, verify_manifest, versions
from radsynth.pipelines.release.samples import DatasetInfo
from radsynth.pipelines.release.stage import _fingerprint, release_license
from radsynth.pipelines.sampling.writers import physical_to_png16
from radsynth.pipelines.scoring.loading import cached_split

from .test_scoring_evaluate import RELEASABLE
from .test_training_stage import tiny_config

# The tiny model draws noise, so quality gates would (rightly) refuse it; they are tested on scorecards in
# test_release_gate_publish.py. Privacy gates stay on: they cannot be switched off.
QUALITY_OFF = ["release.gate.coverage_margin=null", "release.gate.intensity=false",
               "release.gate.mask_dice_ratio_min=null", "release.gate.attribute_adherence_min=null"]
FORMATS = "release.formats=[monai,imagefolder,png16]"


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    return scored_build(tmp_path_factory.mktemp("release"))


def scored_build(root):
    """A tiny build trained, sampled (12) and scored through the CLI: (config, its file, the run folder)."""
    root.mkdir(parents=True, exist_ok=True)
    run_dir = root / "run"
    config = tiny_config(run_dir, "diffusion.max_steps=4", *RELEASABLE, "scoring.utility=false",
                         FORMATS, *QUALITY_OFF, "conditioning.class_attribute=finding")
    config_path = root / "tiny.yaml"
    config_path.write_text(json.dumps(config.model_dump(mode="json", by_alias=True)))
    for command in (["train"], ["generate", "--n", "12"], ["evaluate"]):
        assert main([command[0], str(config_path), *command[1:], "--json"]) == 0
    return config, config_path, run_dir


def release_cli(config_path, *extra, capsys=None):
    code = main(["release", str(config_path), *extra, "--json"])
    return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1]) if capsys else None


@pytest.mark.slow
def test_a_private_build_is_published_with_card_report_and_formats_and_republishing_is_a_no_op(build, capsys):
    config, config_path, run_dir = build
    code, result = release_cli(config_path, capsys=capsys)
    assert code == 0 and result["gate_passed"] and not result["reused"], result
    root = run_dir / "release" / config.data.name
    folder = latest(root)
    assert folder is not None and folder.name == result["version"] == "v1"
    verify_manifest(folder)
    assert result["n_released"] + sum(result["dropped"].values()) == result["n_scored"] == 12

    for name in ("README.md", "report.html", "provenance.json", "scorecard.json", "model_card.md",
                 "monai/datalist.json", "imagefolder/metadata.csv", "png16/metadata.csv"):
        assert (folder / name).is_file(), name
    assert not list(folder.rglob("per_sample.csv")), "nearest-neighbour training ids must never be released"
    released_text = " ".join(p.read_text(errors="ignore") for p in folder.rglob("*") if p.suffix in (".json", ".md", ".csv"))
    train_ids = cached_split(config, "train").ids
    assert not any(case_id in released_text for case_id in train_ids), "a training case id leaked into the release"

    provenance = json.loads((folder / "provenance.json").read_text())
    assert provenance["gate"]["passed"] and provenance["dataset"]["version"] == "v1"
    assert provenance["generator"]["model_hash"] == json.loads(next((run_dir / "samples").glob("*.json")).read_text())[
        "model_hash"]
    assert provenance["training_data"]["patients"] > 0 and "manifest" not in provenance["training_data"]
    with (folder / "png16" / "metadata.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == result["n_released"] and {row["is_synthetic"] for row in rows} <= {"1", "True", "true"}
    assert "SYNTHETIC" in (folder / "report.html").read_text().upper()
    # What the images cost: every released sample was timed by the generate that wrote it
    n = result["n_released"]
    sampling, training = provenance["compute"]["sampling"], provenance["compute"]["training"]
    assert sampling["images"] == n and sampling["seconds_per_image"] > 0 and sampling["energy_j_per_image"] is None
    assert training["seconds"] > 0 and training["devices"][0].startswith("CPU")
    card = (folder / "README.md").read_text()
    assert "## Compute" in card and f"energy not measured ({n} of {n} images timed)" in card

    code, again = release_cli(config_path, capsys=capsys)
    assert code == 0 and again["reused"] and again["version"] == "v1"
    assert [v.name for v in versions(root)] == ["v1"]


@pytest.mark.slow
def test_planted_copies_are_refused_with_a_report_and_the_last_release_stays(build, tmp_path, capsys):
    config, config_path, run_dir = build
    assert release_cli(config_path, capsys=capsys)[0] == 0  # v1 exists (or already existed)
    planted = tmp_path / "planted"
    shutil.copytree(run_dir / "samples", planted)
    train = cached_split(config, "train")
    physical = train.physical()
    for index, sidecar_path in enumerate(sorted(planted.glob("*.json"))[:4]):  # a third of the set: exact copies
        sidecar = json.loads(sidecar_path.read_text())
        pixels = physical_to_png16(physical[index], sidecar["png_low"], sidecar["png_high"])
        PILImage.fromarray(pixels).save(planted / sidecar["file"])
    assert main(["evaluate", str(config_path), "--samples", str(planted), "--out", str(tmp_path / "eval"), "--json"]) == 0
    capsys.readouterr()

    code, result = release_cli(config_path, "--samples", str(planted), "--eval", str(tmp_path / "eval"), capsys=capsys)
    assert code == GATE_REFUSED_EXIT and result["gate_passed"] is False
    assert "min_dcr" in result["failed"], result
    report = json.loads((Path(result["report"]) / "gate_report.json").read_text())
    checks = {check["name"]: check for check in report["checks"] if check["stratum"] == "all"}
    assert checks["min_dcr"]["privacy"] and checks["min_dcr"]["margin"] < 0 and "exact copy" in checks["min_dcr"]["reason"]
    # The copy rate (4 of 12) is reported, but against a 6-image holdout its sampling allowance is wide (limit
    # ~0.42): with so few unseen images only the exact-copy check can refuse this build.
    assert checks["copy_rate"]["value"] >= 4 / 12
    assert report["filter"]["dropped"]["privacy"] >= 4
    markdown = (run_dir / "release" / config.data.name / "refused" / "gate_report.md").read_text()
    assert "FAILED" in markdown and "copy_rate" in markdown
    root = run_dir / "release" / config.data.name
    assert [v.name for v in versions(root)] == ["v1"] and latest(root).name == "v1"


@pytest.mark.slow
def test_a_release_killed_at_any_point_leaves_the_previous_version_or_the_new_one(build, tmp_path):
    config, config_path, run_dir = build
    assert main(["release", str(config_path), "--json"]) == 0
    root = run_dir / "release" / config.data.name
    killed_while_staging = 0
    # Each set of formats is another build, so each run writes a new version; each is killed at another moment.
    for delay, formats in ((0.0, ["png16"]), (0.3, ["monai"]), (0.8, ["imagefolder"]), (1.5, ["png16", "monai"])):
        before = {v.name for v in versions(root)}
        changed = tmp_path / f"{'-'.join(formats)}.yaml"
        changed.write_text(json.dumps({**json.loads(config_path.read_text()),
                                       "release": {**config.release.model_dump(mode="json"), "formats": formats}}))
        process = subprocess.Popen([sys.executable, "-m", "radsynth.flows.cli", "release", str(changed), "--json"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while not list(root.glob(".staging-*")) and process.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(delay)
        killed_while_staging += bool(list(root.glob(".staging-*"))) and process.poll() is None
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        current = latest(root)
        assert current is not None and current.name in before | {f"v{max(int(v[1:]) for v in before) + 1}"}
        for version in versions(root):
            verify_manifest(version)  # every version folder is complete, whenever the kill came
        assert main(["release", str(changed), "--json"]) == 0  # the rerun finishes the interrupted release
        assert not list(root.glob(".staging-*")) and {v.name for v in versions(root)} > before
        verify_manifest(latest(root))
    assert killed_while_staging >= 2, "the kills must land while a release is being written"


@pytest.mark.slow
def test_bad_release_input_is_one_line_exit_2_and_nothing_written(build, tmp_path, capsys):
    config, config_path, run_dir = build
    destination = tmp_path / "out"
    code = main(["release", str(config_path), f"release.destination={destination}", "--eval", str(tmp_path / "missing")])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1 and "no scorecard" in error[0] and "radsynth evaluate" in error[0]
    code = main(["release", str(config_path), "release.formats=[nnunet]", f"release.destination={destination}"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1 and "release.formats" in error[0] and "label map" in error[0]
    assert not destination.exists()
    code = main(["release", str(config_path), "release.gate.membership_tpr_max=0.5"])
    assert code == 2 and "membership_tpr_max" in capsys.readouterr().err


def test_a_release_inherits_its_training_datas_single_license_and_states_mixed_ones():
    config = load_config("demo")
    # Share-alike terms carry over: a release from CC BY-SA data must not be offered as CC BY.
    assert release_license(config, {"licenses": {"CC BY-SA 4.0": 208}}).startswith("CC BY-SA 4.0 (")
    mixed = release_license(config, {"licenses": {"CC BY 3.0": 84, "CC BY 4.0": 6}})
    assert mixed.startswith("other (") and "CC BY 3.0, CC BY 4.0" in mixed
    assert release_license(config, {"licenses": {"unknown": 10}}).startswith("other (")
    chosen = load_config("demo", ["release.license=CC-BY-NC-4.0"])
    assert release_license(chosen, {"licenses": {"CC0-1.0": 5}}) == "CC-BY-NC-4.0"


def test_the_same_samples_under_another_license_are_another_release(tmp_path):
    """A release is a no-op only when nothing it writes would change; the license is in every dataset.json."""
    config, scorecard = load_config("demo"), tmp_path / "scorecard.json"
    scorecard.write_text("{}")
    first, second = (DatasetInfo("d", "xray", 2, license=text) for text in ("CC0-1.0 (...)", "CC BY-SA 4.0 (...)"))
    assert _fingerprint(config, first, [], scorecard, GateResult()) == _fingerprint(config, first, [], scorecard, GateResult())
    assert _fingerprint(config, first, [], scorecard, GateResult()) != _fingerprint(config, second, [], scorecard, GateResult())


@pytest.mark.slow
def test_a_pairs_build_of_the_demo_releases_every_segmentation_format_nnunet_verifies_and_datasets_loads_once(
        tmp_path, capsys):
    """The demo's pairs (generated label maps, nothing derived from a real case) through train, generate, evaluate
    and release: nnU-Net's own integrity check passes on the release, and ``load_dataset`` on its root gives each
    sample once, with its label map."""
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    from .test_pairs import GENERATED

    datasets = pytest.importorskip("datasets")
    run_dir = tmp_path / "run"
    config = tiny_config(run_dir, *GENERATED, "diffusion.max_steps=4", *RELEASABLE, "scoring.utility=false",
                         *QUALITY_OFF, "sampling.pairs=true", "sampling.mask_source=generated",
                         "release.formats=[nnunet,msd,monai,imagefolder,png16]",
                         "release.drop_intensity_outliers=false")  # the 4-step model draws noise: formats are the point
    config_path = tmp_path / "pairs.yaml"
    config_path.write_text(json.dumps(config.model_dump(mode="json", by_alias=True)))
    for command in (["train"], ["generate", "--n", "12"], ["evaluate"]):
        assert main([command[0], str(config_path), *command[1:], "--json"]) == 0
    capsys.readouterr()
    code, result = release_cli(config_path, capsys=capsys)
    assert code == 0 and result["gate_passed"], result
    release = Path(result["release"])
    assert {"nnunet", "msd", "monai", "imagefolder", "png16"} <= {path.name for path in release.iterdir()}

    (nnunet,) = (release / "nnunet").iterdir()
    verify_dataset_integrity(str(nnunet), num_processes=1)  # raises on missing files, bad labels, shape or spacing
    released = sorted(path.name.removesuffix("_0000.png") for path in (nnunet / "imagesTr").iterdir())
    assert len(released) == result["n_released"] > 0

    rows = datasets.load_dataset(str(release), cache_dir=str(tmp_path / "hf"))["train"]
    assert rows.num_rows == result["n_released"] and len(set(rows["sample_id"])) == rows.num_rows
    for row in rows:
        sidecar = json.loads((run_dir / "samples" / f"{row['sample_id']}.json").read_text())
        assert sidecar["mask"] == {"mask_source": "generated", "derived_from_real": False}
        label = np.asarray(PILImage.open(run_dir / "samples" / sidecar["label_file"]))
        assert np.array_equal(np.asarray(row["mask"]), label)

"""What is released is exactly what was scored: tampering after `radsynth evaluate` ends in a dropped sample or a
refusal, never in a release of the tampered bytes; sidecars cannot point out of their sample folder."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image as PILImage

from radsynth.configs import UserInputError
from radsynth.flows.cli import GATE_REFUSED_EXIT, main
from radsynth.pipelines.release.publish import versions
from radsynth.pipelines.release.samples import read_sample_folder
from radsynth.pipelines.release.selection import read_per_sample, select_samples
from radsynth.pipelines.sampling.sidecar import read_sidecar
from radsynth.pipelines.sampling.writers import physical_to_png16
from radsynth.pipelines.scoring.loading import cached_split

from .test_release_stage import release_cli, scored_build


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    return scored_build(tmp_path_factory.mktemp("trust"))


def tampered_copy(run_dir, tmp_path, name: str):
    """A copy of the build's samples and scorecard, to tamper with after scoring."""
    samples, scored = tmp_path / name / "samples", tmp_path / name / "eval"
    shutil.copytree(run_dir / "samples", samples)
    shutil.copytree(run_dir / "eval", scored)
    return samples, scored


def edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def overwrite_with_a_training_image(config, samples, sample_id: str = "syn_000000") -> bytes:
    sidecar = json.loads((samples / f"{sample_id}.json").read_text())
    pixels = physical_to_png16(cached_split(config, "train").physical()[0], sidecar["png_low"], sidecar["png_high"])
    PILImage.fromarray(pixels).save(samples / sidecar["file"])
    return (samples / sidecar["file"]).read_bytes()


def released_bytes(root) -> set[bytes]:
    return {path.read_bytes() for version in versions(root) for path in version.rglob("*.png")}


@pytest.mark.slow
def test_one_sample_changed_after_scoring_is_dropped_by_name_and_never_released(build, tmp_path):
    config, config_path, run_dir = build
    samples, scored = tampered_copy(run_dir, tmp_path, "one")
    planted = overwrite_with_a_training_image(config, samples)
    edit_json(samples / "syn_000001.json", prompt="view: PA. Patient Jane Roe MRN 123456")  # the sidecar, edited
    selection = select_samples(read_sample_folder(samples), read_per_sample(scored / "per_sample.csv"), config.release)
    assert selection.dropped["syn_000000"] == "changed_since_scoring" == selection.dropped["syn_000001"]
    assert selection.changes == {"syn_000000": "image differ from what was scored",
                                 "syn_000001": "sidecar differ from what was scored"}
    assert all(sample.sample_id not in ("syn_000000", "syn_000001") for sample in selection.kept)
    # Two of twelve is more than the folder can have changed and still be the one scored: refused, by name.
    destination = tmp_path / "one" / "release"
    code = main(["release", str(config_path), f"release.destination={destination}", "--samples", str(samples),
                 "--eval", str(scored), "--json"])
    assert code == GATE_REFUSED_EXIT
    report = json.loads((destination / config.data.name / "refused" / "gate_report.json").read_text())
    check = next(c for c in report["checks"] if c["name"] == "scored_bytes")
    assert not check["passed"] and check["privacy"] and "syn_000000: image differ" in check["reason"]
    assert report["filter"]["changed_since_scoring"]["syn_000001"] == "sidecar differ from what was scored"
    assert planted not in released_bytes(destination / config.data.name)


@pytest.mark.slow
@pytest.mark.parametrize("tamper", ["regenerated after scoring", "another build's sample folder",
                                    "another model named", "scorecard from older radsynth"])
def test_a_stale_or_foreign_scorecard_is_refused(build, tmp_path, tamper):
    config, config_path, run_dir = build
    samples, scored = tampered_copy(run_dir, tmp_path, "stale")
    if tamper in ("regenerated after scoring", "another build's sample folder"):
        for image in sorted(samples.glob("syn_*.png")):
            pixels = np.asarray(PILImage.open(image))
            PILImage.fromarray(np.ascontiguousarray(pixels[:, ::-1])).save(image)  # other bytes, same ids
        if tamper == "another build's sample folder":
            for sidecar in samples.glob("syn_*.json"):
                edit_json(sidecar, seed=json.loads(sidecar.read_text())["seed"] + 1)
    elif tamper == "another model named":
        for sidecar in samples.glob("syn_*.json"):
            edit_json(sidecar, model_hash="0" * 64)
    else:
        with (scored / "per_sample.csv").open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        with (scored / "per_sample.csv").open("w", newline="") as handle:
            columns = [column for column in rows[0] if not column.endswith("sha256")]
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    destination = tmp_path / "stale" / "release"
    code = main(["release", str(config_path), f"release.destination={destination}", "--samples", str(samples),
                 "--eval", str(scored), "--json"])
    assert code == GATE_REFUSED_EXIT
    report = json.loads((destination / config.data.name / "refused" / "gate_report.json").read_text())
    assert not next(c for c in report["checks"] if c["name"] == "scored_bytes")["passed"]
    assert report["filter"]["dropped"]["changed_since_scoring"] == report["filter"]["n_scored"]
    assert not versions(destination / config.data.name)


@pytest.mark.slow
def test_scoring_settings_changed_since_the_scorecard_refuse_the_release(build, tmp_path, capsys):
    config, config_path, run_dir = build
    code, result = release_cli(config_path, f"release.destination={tmp_path / 'out'}", "scoring.bootstrap_samples=11",
                               capsys=capsys)
    assert code == GATE_REFUSED_EXIT and "scoring_settings" in result["failed"]


@pytest.mark.slow
def test_hidden_temporary_files_left_in_the_sample_folder_are_neither_scored_nor_released(build, tmp_path, capsys):
    config, config_path, run_dir = build
    samples = tmp_path / "hidden" / "samples"
    shutil.copytree(run_dir / "samples", samples)
    shutil.copy(samples / "syn_000000.png", samples / ".syn_000099.4242.tmp.png")  # a writer killed mid-sample
    shutil.copy(samples / "syn_000000.json", samples / ".syn_000099.4242.tmp.json")
    scored, destination = tmp_path / "hidden" / "eval", tmp_path / "hidden" / "release"
    assert main(["evaluate", str(config_path), "--samples", str(samples), "--out", str(scored), "--json"]) == 0
    capsys.readouterr()
    code, result = release_cli(config_path, f"release.destination={destination}", "--samples", str(samples),
                               "--eval", str(scored), capsys=capsys)
    # The hidden copy is neither a scored sample nor a changed one; whatever the filter drops on its own grounds
    # (an intensity outlier, say: it depends on the torch thread count the build fixture trained with) is all
    # that keeps one of the 12 from the release.
    assert code == 0 and result["n_scored"] == 12 and not result["changed_since_scoring"], result
    assert result["dropped"]["changed_since_scoring"] == 0
    assert result["n_released"] == 12 - sum(result["dropped"].values())


@pytest.mark.parametrize(("field", "value", "message"), [
    ("file", "../train/cache/case.png", "names the image '../train/cache/case.png'"),
    ("file", "syn_000007.png", "names the image 'syn_000007.png'"),
    ("label_file", "/etc/passwd", "names the label map '/etc/passwd'"),
    ("is_synthetic", False, "field 'is_synthetic'"),
    ("seed", "not a seed", "field 'seed'"),
])
def test_a_sidecar_pointing_out_of_its_sample_or_missing_provenance_is_one_line(tmp_path, field, value, message):
    sidecar = {"file": "syn_000003.png", "is_synthetic": True, "format": "png16", "prompt": "finding: none.",
               "seed": 1, "scheduler": "ddim", "num_inference_steps": 50, "guidance_scale": 1.5, "model_hash": "ab",
               "shape": [8, 8], "spacing": [1.0, 1.0], field: value}
    path = tmp_path / "syn_000003.json"
    path.write_text(json.dumps(sidecar))
    with pytest.raises(UserInputError) as caught:
        read_sidecar(path)
    assert message in str(caught.value) and "\n" not in str(caught.value) and str(path) in str(caught.value)

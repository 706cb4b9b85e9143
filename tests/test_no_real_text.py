"""No real text leaves: a dataset whose reports hold names, record numbers and dates, built and released through
the commands; none of those strings is in any byte of the release, of the model folder's configs or of the logs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from radsynth.pipelines.data.io import write_png

from .conftest import blob_volume
from .test_flows import radsynth
from .test_training_stage import TINY_2D

N_CASES = 160  # two images per patient: 80 patients, so the holdout has the 10 patients the gate needs


def surname(index: int) -> str:
    """A made-up name per patient, letters only (the tokenizer splits digits off, which would share tokens)."""
    letters = "".join(chr(ord("a") + (index // 26**power) % 26) for power in range(3))
    return f"Qu{letters}ton"


def identifiers(patient: int) -> tuple[str, str, str]:
    return f"Jane {surname(patient)}", f"{4711000 + patient}", f"2021-03-{1 + patient % 28:02d}"


def write_reports_dataset(root) -> None:
    rng = np.random.default_rng(0)
    rows = ["id,patientid,finding,sex,report"]
    for index in range(N_CASES):
        image, label = blob_volume(rng, (32, 32))
        scaled = (image - image.min()) / (image.max() - image.min())
        write_png(root / "images" / f"img{index:03d}.png", (scaled * 65535).astype(np.uint16))
        write_png(root / "masks" / f"img{index:03d}.png", ((label > 0) * 255).astype(np.uint8))
        name, mrn, date = identifiers(index // 2)
        report = f"Patient {name} MRN {mrn} seen {date} at Ward 7 for cough"
        rows.append(f"img{index:03d},p{index // 2},{'nodule' if index % 4 == 0 else 'none'},{'MF'[index % 2]},{report}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")


@pytest.mark.slow
def test_names_record_numbers_and_dates_of_real_reports_never_leave(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    write_reports_dataset(data)
    overrides = [*[o for o in TINY_2D if not o.startswith("data.phantom")], "data.name=reports", "data.format=image_folder",
                 f"data.root={data}", "data.modality=xray", "data.image_folder.patient_column=patientid",
                 "data.image_folder.text_column=report", "data.image_folder.attribute_columns=[finding,sex]",
                 "conditioning.attributes=[finding,sex]", "diffusion.max_steps=4", "autoencoder.max_steps=4",
                 f"runtime.output_dir={run}", "scoring.bootstrap_samples=10", "scoring.self_supervised_steps=5",
                 "scoring.segmenter_steps=5", "scoring.classifier_steps=5", "scoring.utility=false",
                 "scoring.membership_timesteps=2", "release.formats=[monai,imagefolder,png16]",
                 "release.gate.coverage_margin=null", "release.gate.intensity=false",
                 "release.gate.mask_dice_ratio_min=null", "release.gate.attribute_adherence_min=null",
                 "release.license=CC0-1.0",
                 "release.drop_intensity_outliers=false"]  # the 4-step model draws noise: the text is the point
    logs = []
    for command in (["train"], ["generate", "--n", "12"], ["evaluate"], ["release"]):
        done = radsynth(command[0], "demo", *overrides, *command[1:], "--json")
        logs += [done.stdout, done.stderr]
        assert done.returncode in (0, 3), done.stderr[-3000:]
    assert done.returncode == 0, done.stderr[-3000:]  # the release was published: its bytes are what we read

    release = run / "release" / "reports"
    released = [path for path in release.rglob("*") if path.is_file()]
    assert any(path.name == "metadata.csv" for path in released) and any(path.name == "report.html" for path in released)
    model_configs = [path for path in (run / "model").rglob("*") if path.suffix in (".json", ".md")]
    haystacks = {str(path): path.read_bytes().decode("latin-1").lower() for path in released + model_configs}
    haystacks.update({f"log {i}": log.lower() for i, log in enumerate(logs)})
    for patient in range(N_CASES // 2):
        for needle in identifiers(patient):
            for where, text in haystacks.items():
                assert needle.lower() not in text, f"{needle!r} found in {where}"
    # Words every report shares are ordinary vocabulary; one patient's name is not.
    vocab = json.loads((run / "model" / "text_encoder" / "config.json").read_text())["vocab"]
    assert "cough" in vocab and not any(surname(patient).lower() in vocab for patient in range(N_CASES // 2))
    provenance = json.loads((release / "latest" / "provenance.json").read_text())
    assert provenance["config"]["data"]["root"] == "<local>" and str(data) not in json.dumps(provenance)

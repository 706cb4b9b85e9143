"""The dataset card and the HTML report of a release, from real sample folders written by ``write_sample``."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
import yaml
from PIL import Image as PILImage

from radsynth.pipelines.release.card import write_dataset_card
from radsynth.pipelines.release.report import (
    CT_SOFT_TISSUE_WINDOW,
    DISPLAY_SIZE,
    OVERLAY_ALPHA,
    PLANE_GAP,
    label_colour,
    write_html_report,
)
from radsynth.pipelines.release.samples import read_sample_folder
from radsynth.pipelines.sampling.compute_log import COMPUTE_LOG, log_batch, sampling_compute
from radsynth.pipelines.sampling.writers import write_sample

PLANTED_IDS = ("PAT-12345", "CASE-0001", "/hospital/archive")
SIDE = 32  # 2D samples: 32 x 32 at 1 mm, so the gallery scales them by DISPLAY_SIZE / 32 exactly
VOLUME_SHAPE, VOLUME_SPACING = (24, 20, 16), (1.0, 1.0, 2.0)
REQUIRED_SECTIONS = ("Synthetic data", "Intended use", "Out-of-scope use", "Dataset structure", "Generation", "Compute",
                     "Training data", "Evaluation", "Gate results", "Privacy", "Known limitations", "Citation and software")


def _sidecar(prompt: str, index: int) -> dict:
    return {"prompt": prompt, "seed": 1000 + index, "scheduler": "ddim", "num_inference_steps": 50,
            "guidance_scale": 3.0, "model_hash": "ab" * 32, "modality": "xray"}


def _xray_label(index: int) -> np.ndarray:
    """Label 1 in a block at the top left, label 2 in a smaller block at the bottom right, shifted per sample."""
    label = np.zeros((SIDE, SIDE), np.uint8)
    label[4 + index: 14 + index, 4:16] = 1
    label[20:26, 18 + index: 24 + index] = 2
    return label


@pytest.fixture(scope="module")
def xray_samples(tmp_path_factory):
    """Five 2D X-ray samples: three effusion (labelled), one nodule (labelled), one without a prompt header or label."""
    folder = tmp_path_factory.mktemp("xray")
    rng = np.random.default_rng(0)
    prompts = ["finding: effusion; view: PA. Moderate left pleural effusion."] * 2 + [
        "finding: effusion; view: AP. Small effusion.", "finding: nodule; view: PA. Solitary nodule <script>alert(1)</script>.",
        "A chest radiograph without a structured header."]
    for index, prompt in enumerate(prompts):
        image = rng.normal(1000, 200, (SIDE, SIDE)) + np.linspace(0, 2000, SIDE)[None, :]
        label = _xray_label(index) if index < 4 else None
        write_sample(folder, f"syn_{index:03d}", image, (1.0, 1.0), "png16", _sidecar(prompt, index), label=label)
    return read_sample_folder(folder)


@pytest.fixture(scope="module")
def ct_samples(tmp_path_factory):
    """Two 3D CT volumes (RAS, 1 x 1 x 2 mm) in HU: soft tissue at 0 HU, an organ (label 1) and a small lesion (label 2)."""
    folder = tmp_path_factory.mktemp("ct")
    for index, finding in enumerate(("mass", "none")):
        label = np.zeros(VOLUME_SHAPE, np.uint8)
        label[4:20, 4:16, 3:13] = 1
        label[14:18, 10:14, 8:11] = 2  # the smallest structure: the slices go through its centre
        image = np.where(label == 1, 60.0, 0.0) + np.where(label == 2, 200.0, 0.0)
        sidecar = {**_sidecar(f"finding: {finding}; sex: F. Contrast CT of the abdomen.", index), "modality": "ct"}
        write_sample(folder, f"ct_{index:03d}", image, VOLUME_SPACING, "nifti", sidecar, label=label)
    return read_sample_folder(folder)


def _provenance(modality: str = "xray", spatial_dims: int = 2, gate_passes: bool = False) -> dict:
    checks = [
        {"name": "copy rate", "stratum": "all", "value": 0.012, "limit": 0.08, "comparison": "<=", "passed": True,
         "privacy": True, "reason": ""},
        {"name": "membership inference TPR", "stratum": "all", "value": 0.351, "limit": 0.03, "comparison": "<=",
         "passed": gate_passes, "privacy": True, "reason": "" if gate_passes else "0.351 above 0.03"},
        {"name": "coverage (random_cnn)", "stratum": "finding=effusion", "value": 0.56, "limit": 0.4, "comparison": ">=",
         "passed": True, "privacy": False, "reason": ""},
    ]
    rows = [
        {"section": "realism", "metric": "frechet_distance", "feature_space": "random_cnn", "stratum": "all", "value": 2.271,
         "ci_low": 2.475, "ci_high": 3.147, "sd": 0.17, "reference_name": "real vs real", "reference_value": 1.408,
         "reference_ci_low": 1.770, "reference_ci_high": 2.425, "n": 72, "better": "lower", "note": None},
        {"section": "realism", "metric": "coverage", "feature_space": "random_cnn", "stratum": "all", "value": 0.5595,
         "ci_low": 0.5026, "ci_high": 0.738, "sd": 0.06, "reference_name": "real vs real", "reference_value": 0.7857,
         "reference_ci_low": 0.6084, "reference_ci_high": 0.8496, "n": 72, "better": "near reference", "note": None},
        {"section": "privacy", "metric": "copy_rate", "feature_space": "pixels or self_supervised", "stratum": "all",
         "value": 0.015, "ci_low": None, "ci_high": None, "sd": None, "reference_name": "holdout", "reference_value": 0.027,
         "reference_ci_low": None, "reference_ci_high": None, "n": 200, "better": "near reference", "note": None},
    ]
    labels = {"0": "background", "1": "right_lung", "2": "effusion"} if modality == "xray" else \
        {"0": "background", "1": "liver", "2": "lesion"}
    return {
        "dataset": {"name": f"demo-{modality}", "version": "v3", "created": "2025-06-01T12:00:00", "modality": modality,
                    "spatial_dims": spatial_dims, "n_samples": 5, "label_names": labels, "formats": ["nnunet", "monai"],
                    "internal": False, "derived_from_real": 0},
        "generator": {"model_hash": "ab" * 32, "model_card": "../model/README.md", "objective": "v_prediction",
                      "scheduler": "ddim", "num_inference_steps": 50, "guidance_scale": 3.0},
        "training_data": {
            "dataset_cases": 240, "patients": 160, "modality": {modality: 240}, "body_region": {"chest": 240},
            "origin": {"phantom": 240}, "licenses": {"CC0-1.0": 240}, "with_label": 240, "preprocessed_shape": [64, 64],
            "splits": {"train": {"cases": 168, "patients": 118}, "holdout": {"cases": 37, "patients": 23},
                       "test": {"cases": 35, "patients": 19}},
            "source_spacing": {"median": [3.125, 3.125]},
            "attributes": {"finding": {"none": 116, "effusion": 21, "pneumothorax": 3},
                           "accession": {"CASE-0001": 1}},  # not a prompted attribute: must never be listed
            # Identifiers that must never be rendered, wherever they hide.
            "patient_id": "PAT-12345", "case_ids": ["CASE-0001"], "manifest": "/hospital/archive/manifest.jsonl",
        },
        "config": {"data": {"name": f"demo-{modality}", "format": "phantom", "root": "/hospital/archive/PAT-12345"},
                   "conditioning": {"attributes": ["finding", "view"], "class_attribute": None},
                   "sampling": {"scheduler": "ddim", "num_inference_steps": 50, "guidance_scale": 3.0, "prompts": []},
                   "release": {"formats": ["nnunet", "monai"], "internal": False}},
        "seeds": {"runtime_seed": 0, "sample_seeds": "derived from (model hash, sampling config, index)"},
        "software": {"radsynth": "0.1.0", "torch": "2.13.0+cpu"},
        "scorecard": {"sizes": {"synthetic": 200, "train": 168, "holdout": 37, "test": 35},
                      "verdicts": {"privacy": {"passed": gate_passes, "reasons": [] if gate_passes else ["TPR 0.351"]}},
                      "rows": rows},
        "filter": {"n_scored": 7, "n_released": 5,
                   "dropped": {"privacy": 2, "intensity": 0, "adherence": 0, "derived_from_real": 0}},
        "gate": {"passed": gate_passes, "checks": checks},
        "limitations": ["Trained on 168 images: rare findings are few."],
    }


# ---- the card -------------------------------------------------------------------------------------------------


def _front_matter_and_body(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(front), body


def test_card_has_front_matter_and_every_section_in_order(tmp_path):
    (tmp_path / "nnunet").mkdir()
    (tmp_path / "nnunet" / "dataset.json").write_text("{}")
    meta, body = _front_matter_and_body(write_dataset_card(tmp_path, _provenance()).read_text())

    assert {"synthetic", "medical-imaging", "x-ray", "2d"} <= set(meta["tags"])
    assert meta["task_categories"] == ["image-segmentation"]
    assert meta["size_categories"] == ["n<1K"] and meta["license"] == "other"
    assert meta["pretty_name"] == "demo-xray v3 (synthetic)"
    headings = re.findall(r"^## (.+)$", body, flags=re.MULTILINE)
    assert headings == list(REQUIRED_SECTIONS)
    assert body.startswith("\n# demo-xray v3 (synthetic)")
    assert "**Every image in this dataset is synthetic" in body
    assert "nnunet/  (1 files)" in body  # the structure lists what the release folder holds
    assert "`" + "ab" * 32 + "`" in body and "[../model/README.md](../model/README.md)" in body
    # the headline table: synthetic value with its CI next to the real floor with its CI
    assert "| 2.271 (2.475 to 3.147) | real vs real: 1.408 (1.77 to 2.425) | 72 | lower |" in body


def test_card_and_report_say_at_which_noise_levels_the_samples_were_guided(tmp_path, xray_samples):
    provenance = _provenance()
    assert "noise levels" not in write_dataset_card(tmp_path, provenance).read_text()
    provenance["generator"]["guidance_interval"] = [0.3, 0.7]
    assert "guidance scale 3 at noise levels 0.3 to 0.7" in write_dataset_card(tmp_path, provenance).read_text()
    assert "guidance 3 at noise levels 0.3 to 0.7" in write_html_report(tmp_path, xray_samples, provenance).read_text()


@pytest.mark.parametrize("license_text, identifier", [
    ("CC BY-SA 4.0 (the training data's license; synthetic data)", "cc-by-sa-4.0"),
    ("CC0-1.0 (the training data's license; synthetic data)", "cc0-1.0"),
    ("other (training data: CC BY 3.0, CC BY 4.0; see the dataset card)", "other"),
])
def test_card_states_the_license_and_gives_the_hub_its_identifier(tmp_path, license_text, identifier):
    provenance = _provenance()
    provenance["dataset"]["license"] = license_text
    meta, body = _front_matter_and_body(write_dataset_card(tmp_path, provenance).read_text())
    assert meta["license"] == identifier and f"License: {license_text}." in body


def test_card_names_failed_gate_checks_with_value_and_limit(tmp_path):
    body = write_dataset_card(tmp_path, _provenance(gate_passes=False)).read_text()
    assert "Release gate: **FAILED**" in body
    assert "Dataset-level gate: **FAILED**; failed: membership inference TPR." in body
    failing = next(line for line in body.splitlines() if line.startswith("| membership inference TPR"))
    assert "| 0.351 | ≤ 0.03 | FAILED | 0.351 above 0.03 |" in failing
    passing = next(line for line in body.splitlines() if line.startswith("| coverage (random_cnn)"))
    assert "| finding=effusion | 0.56 | ≥ 0.4 | PASSED |" in passing
    assert "Privacy checks of the gate: 1 of 2 passed." in body

    provenance = _provenance(gate_passes=True)
    provenance["gate"]["notes"] = ["coverage: not gated (release.gate.coverage_margin is null)"]
    passed = write_dataset_card(tmp_path, provenance).read_text()
    assert "Release gate: **PASSED**" in passed and "failed:" not in passed
    assert "- coverage: not gated (release.gate.coverage_margin is null)" in passed  # a gate switched off is said


def test_card_renders_aggregates_and_never_identifiers(tmp_path):
    body = write_dataset_card(tmp_path, _provenance()).read_text()
    for planted in PLANTED_IDS:
        assert planted not in body
    assert "accession" not in body  # an attribute that is not prompted may be an identifier column
    assert "- cases: 240 from 160 patients" in body
    assert "- train split: 168 cases, 118 patients" in body
    assert "- finding: none 116, effusion 21, pneumothorax <5" in body  # small counts are suppressed


def test_sampling_compute_charges_each_sample_its_batch_share_and_the_card_shows_it_with_training(tmp_path):
    samples = tmp_path / "samples"
    samples.mkdir()
    log_batch(samples, ["syn_0", "syn_1"], 4.0, None, "CPU (x86_64, 2 threads)")
    log_batch(samples, ["syn_2"], 3.0, None, "CPU (x86_64, 2 threads)")
    log_batch(samples, ["syn_1"], 1.0, None, "CPU (x86_64, 2 threads)")  # rewritten later: its last batch counts
    (samples / COMPUTE_LOG).open("a").write('{"samples": ["syn_3"], "seco')  # a line cut by a kill
    compute = sampling_compute(samples, ["syn_0", "syn_1", "syn_2", "syn_3"])
    assert compute == {"images": 3, "seconds_per_image": round((2.0 + 1.0 + 3.0) / 3, 4), "energy_j_per_image": None,
                       "devices": ["CPU (x86_64, 2 threads)"]}
    assert sampling_compute(samples, ["other"]) is None and sampling_compute(tmp_path, ["syn_0"]) is None

    provenance = _provenance()
    provenance["dataset"]["n_samples"] = 4
    provenance["compute"] = {"sampling": compute, "training": {"seconds": 600.0, "energy_j": 7.2e6,
                                                               "devices": ["NVIDIA H200"]}}
    body = write_dataset_card(tmp_path, provenance).read_text()
    assert "- sampling: 2 s per image on CPU (x86_64, 2 threads), energy not measured (3 of 4 images timed)" in body
    assert "- training the generator (once): 600 s on NVIDIA H200, energy 2 kWh (7200000 J); 150 s per released" in body


def test_card_for_3d_ct_with_derived_samples(tmp_path):
    provenance = _provenance("ct", 3)
    provenance["dataset"].update(derived_from_real=2, internal=True, n_samples=12_000)
    provenance["config"]["conditioning"]["class_attribute"] = "finding"
    provenance["training_data"] = None  # not recorded: the card says so instead of failing
    meta, body = _front_matter_and_body(write_dataset_card(tmp_path, provenance).read_text())
    assert {"computed-tomography", "3d"} <= set(meta["tags"])
    assert meta["task_categories"] == ["image-segmentation", "image-classification"]
    assert meta["size_categories"] == ["10K<n<100K"]
    assert "synthetic 3D CT volumes with label maps (liver, lesion)" in body
    assert "Images are in Hounsfield units" in body
    assert "**2 samples are derived from real images**" in body and "**Internal release**" in body
    assert "No summary of the training data was recorded." in body


# ---- the report -----------------------------------------------------------------------------------------------


class _ReportParser(HTMLParser):
    """Gallery images (with their sample and condition), tables by id (row class, cells) and plots of a report."""

    def __init__(self):
        super().__init__()
        self.images: list[dict] = []
        self.conditions: list[str] = []
        self.tables: dict[str, list[tuple[str, list[str]]]] = {}
        self.plots: list[str] = []
        self._sample = self._condition = self._table = None
        self._in_plot = self._in_cell = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section" and "data-condition" in attrs:
            self._condition = attrs["data-condition"]
            self.conditions.append(self._condition)
        elif tag == "figure":
            self._sample, self._in_plot = attrs.get("data-sample"), "plot" in (attrs.get("class") or "")
        elif tag == "img":
            if self._in_plot:
                self.plots.append(attrs["src"])
            else:
                self.images.append({"sample": self._sample, "condition": self._condition, "src": attrs["src"]})
        elif tag == "table":
            self._table = attrs.get("id")
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append((attrs.get("class") or "", []))
        elif tag == "td":
            self._in_cell = True
            self.tables[self._table][-1][1].append("")

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        elif tag == "tr" and self._table is not None and not self.tables[self._table][-1][1]:
            self.tables[self._table].pop()  # the header row: only body rows are kept
        elif tag == "td":
            self._in_cell = False
        elif tag == "figure":
            self._sample, self._in_plot = None, False

    def handle_data(self, data):
        if self._in_cell:
            self.tables[self._table][-1][1][-1] += data


def _parse(text: str) -> _ReportParser:
    parser = _ReportParser()
    parser.feed(text)
    return parser


def _decode(data_uri: str) -> np.ndarray:
    assert data_uri.startswith("data:image/png;base64,")
    with PILImage.open(io.BytesIO(base64.b64decode(data_uri.split(",", 1)[1]))) as image:
        return np.asarray(image.convert("RGB")).astype(np.int64)


def _is_grey(pixels: np.ndarray) -> np.ndarray:
    return (pixels.max(axis=-1) - pixels.min(axis=-1)) == 0


def _is_blend_of(pixels: np.ndarray, colour: tuple[int, int, int], tolerance: float = 1.0) -> np.ndarray:
    """Pixels that are (1 - alpha) * grey + alpha * colour: minus the colour part, all channels are equal."""
    rest = pixels - OVERLAY_ALPHA * np.asarray(colour)
    return (rest.max(axis=-1) - rest.min(axis=-1)) <= tolerance


def _legend_colours(text: str) -> dict[str, tuple[int, int, int]]:
    """Label name -> the swatch colour the page's legend shows for it."""
    swatches = re.findall(r'class="swatch" style="background: rgb\((\d+), (\d+), (\d+)\)"></span>([^<]+)<', text)
    return {name: (int(r), int(g), int(b)) for r, g, b, name in swatches}


def test_report_gallery_has_one_group_per_condition_at_most_n_each(tmp_path, xray_samples):
    text = write_html_report(tmp_path, xray_samples, _provenance(), max_per_condition=2).read_text()
    report = _parse(text)
    # The config's first conditioning attribute (finding) groups by default; a prompt without a header has its own group.
    assert report.conditions == ["(no prompted condition)", "finding: effusion", "finding: nodule"]
    shown = [(image["condition"], image["sample"]) for image in report.images]
    assert shown == [("(no prompted condition)", "syn_004"), ("finding: effusion", "syn_000"),
                     ("finding: effusion", "syn_001"), ("finding: nodule", "syn_003")]
    assert "finding: effusion <small>2 of 3</small>" in text

    full = _parse(write_html_report(tmp_path, xray_samples, _provenance(), group_by=["finding", "view"]).read_text())
    assert full.conditions == ["(no prompted condition)", "finding: effusion; view: AP", "finding: effusion; view: PA",
                               "finding: nodule; view: PA"]


def test_report_images_carry_label_colours_exactly_where_the_mask_is(tmp_path, xray_samples):
    text = write_html_report(tmp_path, xray_samples, _provenance()).read_text()
    report = _parse(text)
    pictures = {image["sample"]: _decode(image["src"]) for image in report.images}
    legend = _legend_colours(text)
    colours = {1: legend["right_lung"], 2: legend["effusion"]}
    assert colours[1] != colours[2]
    scale = DISPLAY_SIZE // SIDE
    for index in range(4):
        picture = pictures[f"syn_{index:03d}"]
        # The plain image on top, the same with its overlay below.
        assert picture.shape == (2 * DISPLAY_SIZE + PLANE_GAP, DISPLAY_SIZE, 3)
        plain, overlaid = picture[:DISPLAY_SIZE], picture[DISPLAY_SIZE + PLANE_GAP:]
        assert _is_grey(plain).all()
        label = np.kron(_xray_label(index), np.ones((scale, scale), np.uint8))
        assert _is_grey(overlaid[label == 0]).all(), "background must stay grey"
        for value in (1, 2):
            assert _is_blend_of(overlaid[label == value], colours[value]).all(), f"label {value} must show its legend colour"
            assert not _is_blend_of(overlaid[label == value], colours[3 - value]).any()
    grey = pictures["syn_004"]
    assert grey.shape == (DISPLAY_SIZE, DISPLAY_SIZE, 3)
    assert _is_grey(grey).all(), "a sample without a label map has no overlay"
    assert grey.min() <= 5 and grey.max() >= 250, "percentile windowing spreads an X-ray over the grey range"


def test_report_shows_3d_ct_as_three_orthogonal_slices_in_a_soft_tissue_window(tmp_path, ct_samples):
    provenance = _provenance("ct", 3)
    report = _parse(write_html_report(tmp_path, ct_samples, provenance).read_text())
    assert report.conditions == ["finding: mass", "finding: none"]
    picture = _decode(report.images[0]["src"])

    # One scale (pixels per mm) for all three views, so 2 mm slices look twice as thick as 1 mm voxels.
    scale = int(DISPLAY_SIZE // max(n * s for n, s in zip(VOLUME_SHAPE, VOLUME_SPACING)))  # 6 pixels per mm
    (x, y, z), (sx, sy, sz) = VOLUME_SHAPE, (int(s) for s in VOLUME_SPACING)
    views = {"axial": (y * sy * scale, x * sx * scale), "coronal": (z * sz * scale, x * sx * scale),
             "sagittal": (z * sz * scale, y * sy * scale)}
    row_height = max(height for height, _ in views.values())
    assert picture.shape == (2 * row_height + PLANE_GAP, sum(width for _, width in views.values()) + 2 * PLANE_GAP, 3)

    soft_tissue = round((0 - CT_SOFT_TISSUE_WINDOW[0]) / (CT_SOFT_TISSUE_WINDOW[1] - CT_SOFT_TISSUE_WINDOW[0]) * 255)
    left, overlaid = 0, {}
    for name, (height, width) in views.items():
        plain = picture[:height, left: left + width]
        overlaid[name] = picture[row_height + PLANE_GAP: row_height + PLANE_GAP + height, left: left + width]
        assert tuple(plain[0, 0]) == (soft_tissue,) * 3, "0 HU sits at 40% grey in a level 40 / width 400 window"
        assert _is_grey(plain).all()
        assert _is_blend_of(overlaid[name], label_colour(2)).any(), "every view passes through the lesion (smallest label)"
        assert _is_blend_of(overlaid[name], label_colour(1)).any()
        left += width + PLANE_GAP

    # Radiological axial view: anterior (high y) at the top, the patient's right (high x in RAS) on the viewer's left.
    lesion = np.zeros((y, x), bool)
    lesion[y - 14: y - 10, x - 18: x - 14] = True  # the lesion spans x 14..17, y 10..13
    expected = np.kron(lesion, np.ones((scale, scale), bool))
    assert (_is_blend_of(overlaid["axial"], label_colour(2)) == expected).all()


def test_report_views_depend_on_anatomy_not_on_storage_order(tmp_path, ct_samples):
    """The same volume stored LPS (x and y flipped, negative affine) shows exactly as the RAS original."""
    original = ct_samples[0]
    image, label = original.read_image(), original.read_label()
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ image.affine
    sidecar = {key: original.sidecar[key] for key in ("prompt", "seed", "scheduler", "num_inference_steps",
                                                      "guidance_scale", "model_hash", "modality")}
    write_sample(tmp_path / "lps", "ct_lps", image.array[::-1, ::-1], lps, "nifti", sidecar,
                 label=label.array[::-1, ::-1].astype(np.uint8))
    flipped = read_sample_folder(tmp_path / "lps")
    pictures = [_decode(_parse(write_html_report(tmp_path / name, samples, _provenance("ct", 3)).read_text()).images[0]["src"])
                for name, samples in (("ras", [original]), ("lps", flipped))]
    assert np.array_equal(*pictures)


def test_report_tables_plots_marking_and_escaping(tmp_path, xray_samples):
    provenance = _provenance()
    text = write_html_report(tmp_path, xray_samples, provenance).read_text()
    report = _parse(text)

    assert 'class="banner"' in text and "SYNTHETIC DATA" in text and "(synthetic data)</title>" in text
    metrics = report.tables["metrics"]
    assert [cells[1] for _, cells in metrics] == ["frechet_distance", "coverage", "copy_rate"]
    assert metrics[0][1][4:6] == ["2.271 (2.475 to 3.147)", "real vs real: 1.408 (1.77 to 2.425)"]
    gate = report.tables["gate-checks"]
    assert [(css, cells[0], cells[2], cells[3], cells[4]) for css, cells in gate] == [
        ("pass", "copy rate", "0.012", "≤ 0.08", "passed"),
        ("fail", "membership inference TPR", "0.351", "≤ 0.03", "failed"),
        ("pass", "coverage (random_cnn)", "0.56", "≥ 0.4", "passed")]
    assert report.tables["filter"][0][1][:3] == ["7", "5", "2"]

    assert len(report.plots) == 2  # metrics against their real floor, gate checks against their limits
    for plot in report.plots:
        pixels = _decode(plot)
        assert pixels.shape[0] > 100 and pixels.std() > 10

    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    for planted in PLANTED_IDS:
        assert planted not in text


def _chromium() -> str | None:
    return next((path for name in ("chromium", "chromium-browser", "google-chrome") if (path := shutil.which(name))), None)


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(tmp_path, xray_samples):
    page = write_html_report(tmp_path, xray_samples, _provenance()).resolve()
    common = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
              "--window-size=1280,2000", "--hide-scrollbars"]
    screenshot = tmp_path / "report.png"
    subprocess.run([*common, f"--screenshot={screenshot}", page.as_uri()], check=True, capture_output=True, timeout=180)
    dom = subprocess.run([*common, "--dump-dom", page.as_uri()], check=True, capture_output=True, text=True,
                         timeout=180).stdout

    with PILImage.open(screenshot) as image:
        pixels = np.asarray(image.convert("RGB")).astype(np.int64)
    assert pixels.shape[:2] == (2000, 1280) and pixels.std() > 20, "the screenshot must not be blank"
    assert (np.abs(pixels[:20] - (106, 27, 154)).sum(axis=-1) <= 6).mean() > 0.5, "the synthetic banner tops the page"
    assert _is_blend_of(pixels, label_colour(1), tolerance=2).sum() > 1000, "the gallery images are drawn with their overlays"

    rendered = _parse(dom)
    assert len(rendered.images) == 5 and len(rendered.plots) == 2
    assert len(re.findall(r"<img\b", dom)) == 7
    assert [cells[0] for _, cells in rendered.tables["gate-checks"]] == ["copy rate", "membership inference TPR",
                                                                        "coverage (random_cnn)"]
    assert "SYNTHETIC DATA" in dom

"""Every user error, table-driven, across the commands: exit 2, exactly one stderr line naming the file or key,
what is wrong and what is allowed, no traceback, and nothing written. A bug is one line and a log, exit 1."""

from __future__ import annotations

import errno
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from radsynth.flows.cli import BUG_EXIT, USER_ERROR_EXIT, main
from radsynth.pipelines.data.io import write_nifti, write_png

from .conftest import REPO, write_image_folder, write_msd_folder
from .test_release_stage import scored_build

FOLDER = ["data.preprocess.target_shape=[16,16]", "data.image_folder.attribute_columns=[finding, sex, age]",
          "conditioning.attributes=[finding,sex]", "data.split.stratify_by=null"]
MSD = ["data.label_names=null", "data.preprocess.target_shape=[16,16,16]"]


@dataclass
class Case:
    """One bad input: ``prepare(tmp_path, build) -> argv`` breaks something and says what to run."""

    name: str
    prepare: object
    expected: tuple[str, ...]  # substrings of the one error line (file or key, problem, what is allowed)
    watched: str = "run"  # the folder (under tmp_path, or "build") that must not change
    needs_build: bool = False
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------- preparations


def image_folder(tmp_path, *overrides, n_cases=6):
    root = write_image_folder(tmp_path / "cxr", n_cases=n_cases)
    return root, ["ingest", str(REPO / "configs" / "cxr.yaml"), f"data.root={root}", *FOLDER,
                  f"runtime.output_dir={tmp_path / 'run'}", *overrides]


def msd_folder(tmp_path, *overrides):
    root = write_msd_folder(tmp_path / "msd", n_cases=4)
    return root, ["ingest", str(REPO / "configs" / "hippocampus.yaml"), f"data.root={root}", *MSD,
                  f"runtime.output_dir={tmp_path / 'run'}", *overrides]


def csv_lines(root) -> list[str]:
    return (root / "manifest.csv").read_text().splitlines()


def write_csv(root, lines) -> None:
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")


def id_with_a_space(tmp_path, build):
    root, argv = image_folder(tmp_path)
    lines = csv_lines(root)
    lines[1] = lines[1].replace("img000", "img 000", 1)
    write_csv(root, lines)
    shutil.move(root / "images" / "img000.png", root / "images" / "img 000.png")
    return argv


def short_csv_row(tmp_path, build):
    root, argv = image_folder(tmp_path)
    lines = csv_lines(root)
    lines[3] = lines[3].rsplit(",", 1)[0]
    write_csv(root, lines)
    return argv


def long_csv_row(tmp_path, build):
    root, argv = image_folder(tmp_path)
    lines = csv_lines(root)
    lines[2] += ",extra"
    write_csv(root, lines)
    return argv


def empty_csv(tmp_path, build):
    root, argv = image_folder(tmp_path)
    write_csv(root, csv_lines(root)[:1])
    return argv


def binary_csv(tmp_path, build):
    root, argv = image_folder(tmp_path)
    (root / "manifest.csv").write_bytes(b"\xff\xfe\x00id\x00\x81\x82")
    return argv


def masks_with_label_values(values):
    def prepare(tmp_path, build):
        root, argv = image_folder(tmp_path)
        mask = np.zeros((40, 36), np.uint8)
        for index, value in enumerate(values):
            mask[5 + 6 * index:9 + 6 * index, 5:15] = value
        write_png(root / "masks" / "img002.png", mask)
        return argv
    return prepare


def negative_age(tmp_path, build):
    root, argv = image_folder(tmp_path)
    lines = csv_lines(root)
    cells = lines[2].split(",")
    cells[4] = "-4"
    lines[2] = ",".join(cells)
    write_csv(root, lines)
    return argv


def decompression_bomb(tmp_path, build):
    root, argv = image_folder(tmp_path)
    PILImage.new("1", (20000, 20000)).save(root / "images" / "img001.png")  # a few kB on disk, 400 Mpx decoded
    return argv


def with_overrides(*overrides, source=image_folder):
    def prepare(tmp_path, build):
        return source(tmp_path, *overrides)[1]
    return prepare


def build_with(*overrides):
    """``radsynth build`` of the image folder: refused before it ingests or trains anything."""
    def prepare(tmp_path, build):
        return ["build", *image_folder(tmp_path, *overrides)[1][1:]]
    return prepare


def output_dir_is_a_file(tmp_path, build):
    (tmp_path / "run").write_text("not a folder")
    return image_folder(tmp_path)[1]


def msd_dataset_json(content):
    def prepare(tmp_path, build):
        root, argv = msd_folder(tmp_path)
        (root / "dataset.json").write_text(content)
        return argv
    return prepare


def msd_case_with_a_space(tmp_path, build):
    root, argv = msd_folder(tmp_path)
    shutil.move(root / "imagesTr" / "case_001.nii.gz", root / "imagesTr" / "case 001.nii.gz")
    return argv


def a_config_file(content):
    def prepare(tmp_path, build):
        path = tmp_path / "bad.yaml"
        path.write_text(content)
        return ["ingest", str(path), f"runtime.output_dir={tmp_path / 'run'}"]
    return prepare


def train_with(*overrides):
    def prepare(tmp_path, build):
        argv = image_folder(tmp_path, *overrides)[1]
        return ["train", *argv[1:]]
    return prepare


def on_build(command, *extra):
    def prepare(tmp_path, build):
        _, config_path, _ = build
        return [command, str(config_path), *extra]
    return prepare


def tampered_samples(change):
    def prepare(tmp_path, build):
        _, config_path, run_dir = build
        samples = tmp_path / "samples"
        shutil.copytree(run_dir / "samples", samples)
        change(samples)
        return ["evaluate", str(config_path), "--samples", str(samples), "--out", str(tmp_path / "run" / "eval")]
    return prepare


def sidecar_field(**fields):
    def change(samples):
        path = samples / "syn_000002.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return change


def score_folders(change):
    def prepare(tmp_path, build):
        config, _, run_dir = build
        folders = {}
        for name in ("train", "holdout", "synthetic"):
            folder = folders[name] = tmp_path / name
            source = run_dir / "samples"
            folder.mkdir()
            for index, png in enumerate(sorted(p for p in source.glob("syn_*.png"))[:6]):
                shutil.copy(png, folder / f"{name}{index}.png")
        change(folders)
        return ["score", "--synthetic", str(folders["synthetic"]), "--train", str(folders["train"]), "--holdout",
                str(folders["holdout"]), "--out", str(tmp_path / "run" / "audit")]
    return prepare


def nan_image(folders):
    write_nifti(folders["train"] / "train9.nii.gz", np.full((8, 8, 1), np.nan, np.float32), np.eye(4))


def constant_image(folders):
    write_png(folders["holdout"] / "holdout9.png", np.full((32, 32), 700, np.uint16))


def empty_synthetic(folders):
    shutil.rmtree(folders["synthetic"])
    folders["synthetic"].mkdir()


def release_with_eval(change):
    def prepare(tmp_path, build):
        _, config_path, run_dir = build
        scored = tmp_path / "eval"
        shutil.copytree(run_dir / "eval", scored)
        change(scored)
        return ["release", str(config_path), f"release.destination={tmp_path / 'run'}", "--eval", str(scored)]
    return prepare


def distill_the_student(tmp_path, build):
    _, config_path, run_dir = build
    student = tmp_path / "fake-student"
    shutil.copytree(run_dir / "model", student)
    index = json.loads((student / "model_index.json").read_text())
    (student / "model_index.json").write_text(json.dumps({**index, "distilled_guidance_scale": 1.5}))
    return ["distill", str(config_path), f"runtime.output_dir={tmp_path / 'run'}", "--model", str(student)]


CASES = [
    # ---------------------------------------------------------------- ingest: image folders
    Case("id with a space", id_with_a_space, ("manifest.csv:2", "'img 000' has characters", "no spaces")),
    Case("CSV row missing a cell", short_csv_row, ("manifest.csv:4", "row has 5 cells, the header 6", "one cell")),
    Case("CSV row with an extra cell", long_csv_row, ("manifest.csv:3", "row has 7 cells, the header 6")),
    Case("CSV with no rows", empty_csv, ("manifest.csv", "CSV has no rows", "one row per image")),
    Case("CSV that is not text", binary_csv, ("manifest.csv", "unreadable CSV", "a UTF-8 CSV with a header row")),
    Case("0/1/2 label PNGs under a threshold", masks_with_label_values([1, 2]),
         ("masks/img002.png", "mask values [1, 2] lie between 0", "mask_threshold: null")),
    Case("multi-valued mask PNG with a threshold", masks_with_label_values([100, 255]),
         ("masks/img002.png", "mask values [100]", "mask_threshold: null")),
    Case("negative age", negative_age, ("img001.png", "has age -4", "0 or more")),
    Case("decompression bomb", decompression_bomb, ("img001.png", "image too large to decode", "images up to")),
    Case("stratify_by naming no attribute", with_overrides("data.split.stratify_by=findng"),
         ("data.split.stratify_by", "no case has the attribute 'findng'", "one of: age, finding, sex")),
    Case("conditioning attribute naming nothing", with_overrides("conditioning.attributes=[finding,view]"),
         ("conditioning.attributes", "no case has the attribute 'view'", "one of:")),
    Case("class attribute naming nothing", with_overrides("conditioning.class_attribute=diagnosis"),
         ("conditioning.class_attribute", "no case has the attribute 'diagnosis'")),
    Case("balancing attribute naming nothing", with_overrides("diffusion.balance_by=findings"),
         ("diffusion.balance_by", "no case has the attribute 'findings'", "one of: age, finding, sex")),
    Case("pixel spacing zero and negative", with_overrides("data.image_folder.pixel_spacing_mm=[0,-1]"),
         ("data.image_folder.pixel_spacing_mm.0", "greater than 0")),
    Case("negative target spacing", with_overrides("data.preprocess.target_spacing=[-1,1]"),
         ("data.preprocess.target_spacing.0", "greater than 0")),
    Case("output dir that is a file", output_dir_is_a_file, ("runtime.output_dir", "is a file", "a folder")),
    Case("missing data root", with_overrides("data.root=/nonexistent/cxr"), ("/nonexistent/cxr", "not found")),
    Case("missing CSV column", with_overrides("data.image_folder.attribute_columns=[finding,view]"),
         ("manifest.csv", "missing CSV columns ['view']", "columns present")),
    # ---------------------------------------------------------------- ingest: MSD folders
    Case("dataset.json that is a list", msd_dataset_json("[]"), ("dataset.json", "is a JSON list", "an object")),
    Case("dataset.json whose labels are a list", msd_dataset_json('{"labels": ["background", "organ"]}'),
         ("dataset.json", "'labels' and 'channel_names' must be objects")),
    Case("dataset.json that is not JSON", msd_dataset_json("{labels: "),
         ("dataset.json", "not valid JSON", "an MSD or nnU-Net v2 dataset.json")),
    Case("MSD file name with a space", msd_case_with_a_space, ("case 001.nii.gz", "has characters", "no spaces")),
    # ---------------------------------------------------------------- config
    Case("YAML that does not parse", a_config_file("data: [unclosed\n"),
         ("bad.yaml", "not valid YAML", "a YAML mapping of sections")),
    Case("YAML that is a list", a_config_file("- data\n"), ("bad.yaml", "top level must be a mapping")),
    Case("unknown config key", with_overrides("data.colour=red"), ("unknown key 'data.colour'", "allowed here")),
    Case("override without a value", with_overrides("runtime.seed"), ("override 'runtime.seed' is not key=value",)),
    Case("split fractions not summing to 1", with_overrides("data.split.train=0.9"),
         ("train + holdout + test must sum to 1",)),
    Case("norm groups that do not divide the channels", train_with("autoencoder.channels=[16,32,32]"),
         ("autoencoder", "must all be divisible by norm_num_groups (32)", "autoencoder.norm_num_groups")),
    Case("grid the networks cannot halve", train_with("data.preprocess.target_shape=[36,36]"),
         ("data.preprocess.target_shape", "[36, 36] is not divisible by 16", "e.g. [48, 48]")),
    Case("CUDA asked for without a GPU", train_with("runtime.device=cuda"),
         ("runtime.device", "'cuda' asked for, but 0 CUDA GPUs are visible", "auto")),
    Case("pairs without masks", with_overrides("sampling.pairs=true"), ("sampling.pairs needs conditioning.use_masks",)),
    Case("guidance interval running backwards", with_overrides("sampling.guidance_interval=[0.6,0.2]"),
         ("sampling.guidance_interval", "got [0.6, 0.2]", "0 <= low < high <= 1")),
    Case("guidance interval past pure noise", with_overrides("sampling.guidance_interval=[0.2,1.5]"),
         ("sampling.guidance_interval", "got [0.2, 1.5]", "0 <= low < high <= 1")),
    Case("a private fine-tune with a ControlNet", with_overrides("finetune.privacy.epsilon=4", "conditioning.use_masks=true"),
         ("conditioning.use_masks", "outside DP-SGD", "set it to false under finetune.privacy")),
    Case("a fine-tune with a mask generator",
         with_overrides("finetune.from=/tmp", "conditioning.use_masks=true", "mask_generator.enabled=true"),
         ("mask_generator.enabled", "a fine-tune trains no mask generator", "set it to false")),
    Case("maps in the UNet without masks", with_overrides("conditioning.mask_input=concat"),
         ("conditioning.mask_input: concat reads label maps", "set conditioning.use_masks: true")),
    Case("maps in the UNet of a fine-tune",
         with_overrides("finetune.from=/tmp", "conditioning.use_masks=true", "conditioning.mask_input=concat"),
         ("conditioning.mask_input: concat", "a pretrained base's UNet reads no label map", "mask_input: controlnet")),
    Case("maps in the UNet under augmentation",
         with_overrides("conditioning.use_masks=true", "conditioning.mask_input=concat",
                        "diffusion.augment.probability=0.5"),
         ("conditioning.mask_input: concat", "would not match their maps", "diffusion.augment.probability: 0")),
    Case("maps in the UNet sampled by the student",
         with_overrides("conditioning.use_masks=true", "conditioning.mask_input=concat",
                        "diffusion.augment.probability=0", "sampling.student=true"),
         ("conditioning.mask_input: concat", "distilled without maps", "sampling.student: false")),
    Case("a map weighting without maps in the UNet", with_overrides("diffusion.rare_label_weight=5"),
         ("diffusion.rare_label_weight", "set conditioning.mask_input: concat", "controlnet.rare_label_weight")),
    Case("a map input that does not exist", with_overrides("conditioning.use_masks=true",
                                                           "conditioning.mask_input=adapter"),
         ("conditioning.mask_input", "controlnet", "concat")),
    Case("processes that machines cannot share", with_overrides("runtime.launch.num_processes=3",
                                                                 "runtime.launch.num_machines=2",
                                                                 "runtime.launch.main_process_ip=10.0.0.1"),
         ("runtime.launch", "num_processes (3) must be a multiple of num_machines (2)")),
    Case("a machine rank past the machines", with_overrides("runtime.launch.machine_rank=2"),
         ("runtime.launch", "machine_rank must be below num_machines (1)")),
    Case("several machines without the first one's address", with_overrides("runtime.launch.num_processes=2",
                                                                             "runtime.launch.num_machines=2"),
         ("runtime.launch", "needs main_process_ip", "the address of machine 0")),
    Case("distill steps beyond its grid", with_overrides("distill.steps=60"),
         ("distill.steps (60) must not exceed distill.teacher_steps (50)",)),
    Case("a build whose images alone cannot fill nnU-Net", build_with("release.formats=[monai,nnunet]"),
         ("release.formats", "nnunet needs a label map for every sample", "sampling.pairs: false", "monai, imagefolder")),
    Case("an augmentation chance over one", with_overrides("diffusion.augment.probability=1.5"),
         ("diffusion.augment.probability", "less than or equal to 1")),
    Case("an augmentation shift of half the grid", with_overrides("diffusion.augment.max_shift=0.5"),
         ("diffusion.augment.max_shift", "less than 0.5")),
    Case("a privacy limit loosened", with_overrides("release.gate.membership_tpr_max=0.5"),
         ("release.gate.membership_tpr_max", "less than or equal to 0.02")),
    # ---------------------------------------------------------------- generate, evaluate, score, release, distill
    Case("zero samples", on_build("generate", "--n", "0"), ("--n", "0 samples", "a positive number"),
         watched="build", needs_build=True),
    Case("a folder without a model", on_build("generate", "--model", "/tmp"), ("/tmp", "no trained model here"),
         watched="build", needs_build=True),
    Case("a sampler that cannot sample the saved model", on_build("generate", "sampling.scheduler=flow_match_euler"),
         ("sampling.scheduler", "cannot sample a model trained with objective 'v_prediction'"),
         watched="build", needs_build=True),
    Case("lesions without pairs", on_build("generate", "--lesion", "nodule 8 mm in right lung"),
         ("--lesion", "lesion edits apply to pairs", "add --pairs"), watched="build", needs_build=True),
    Case("generate on CUDA without a GPU", on_build("generate", "runtime.device=cuda:1"),
         ("runtime.device", "'cuda:1' asked for"), watched="build", needs_build=True),
    Case("sidecar naming a file outside its sample", tampered_samples(sidecar_field(file="../model/README.png")),
         ("syn_000002.json", "names the image '../model/README.png'", "syn_000002.png"), needs_build=True),
    Case("sidecar that is not JSON", tampered_samples(lambda s: (s / "syn_000002.json").write_text("{")),
         ("syn_000002.json", "sidecar is not readable JSON"), needs_build=True),
    Case("sidecar without its seed", tampered_samples(sidecar_field(seed=None)),
         ("syn_000002.json", "field 'seed'"), needs_build=True),
    Case("a folder to score that does not exist", on_build("evaluate", "scoring.sample_dir=/nonexistent/samples"),
         ("/nonexistent/samples", "not a folder"), watched="build", needs_build=True),
    Case("NaN image in a folder to score", score_folders(nan_image), ("train9.nii.gz", "NaN or infinite"),
         needs_build=True),
    Case("blank image in a real folder to score", score_folders(constant_image),
         ("holdout9.png", "every pixel is 700", "real images with contrast"), needs_build=True),
    Case("no synthetic images to score", score_folders(empty_synthetic), ("synthetic", "no images in this folder"),
         needs_build=True),
    Case("a score override outside scoring", lambda tmp_path, build: ["score", "--synthetic", "a", "--train", "b",
                                                                      "--holdout", "c", "data.name=x"],
         ("override 'data.name=x' is not a scoring setting",)),
    Case("scorecard that is not JSON", release_with_eval(lambda e: (e / "scorecard.json").write_text("{")),
         ("scorecard.json", "scorecard is not valid JSON"), needs_build=True),
    Case("scorecard without rows", release_with_eval(lambda e: (e / "scorecard.json").write_text("{}")),
         ("scorecard.json", "field 'sizes': Field required", "written by `radsynth evaluate`"), needs_build=True),
    Case("per-sample table with a bad flag", release_with_eval(
        lambda e: (e / "per_sample.csv").write_text("sample_id,flagged\nsyn_000000,maybe\n")),
         ("per_sample.csv", "column 'flagged'", "written by `radsynth evaluate`"), needs_build=True),
    Case("no scorecard", on_build("release", "--eval", "/nonexistent/eval"),
         ("/nonexistent/eval/scorecard.json", "no scorecard", "radsynth evaluate"), watched="build", needs_build=True),
    Case("nnU-Net format without label maps", on_build("release", "release.formats=[nnunet]"),
         ("release.formats", "label map"), watched="build", needs_build=True),
    Case("distilling a student", distill_the_student, ("already a distilled student", "distil the trained model"),
         needs_build=True),
    Case("distilling without a model", on_build("distill", "--model", "/nonexistent/model"),
         ("/nonexistent/model", "no trained model to distil"), watched="build", needs_build=True),
]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()} \
        if folder.is_dir() else {}


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    return scored_build(tmp_path_factory.mktemp("corpus"))


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, tmp_path, capsys, request):
    built = request.getfixturevalue("build") if case.needs_build else None
    argv = case.prepare(tmp_path, built)
    watched = built[2] if case.watched == "build" else tmp_path / case.watched
    before = snapshot(watched)
    code = main(argv)
    captured = capsys.readouterr()
    errors = [line for line in captured.err.strip().splitlines() if "radsynth:" in line or "Traceback" in line]
    assert code == USER_ERROR_EXIT, captured.err[-2000:]
    assert len(errors) == 1 and errors[0].startswith("radsynth: error: "), captured.err[-2000:]
    assert "Traceback" not in captured.err
    for expected in case.expected:
        assert expected in errors[0], (expected, errors[0])
    after = snapshot(watched)
    if case.watched == "run" and case.name != "output dir that is a file":
        assert not any("manifest.jsonl" in path or ".safetensors" in path for path in after), "ingest wrote"
    assert {p: v for p, v in after.items() if p not in before or before[p] != v} == {} or case.watched == "run"


def test_a_full_disk_is_one_line_exit_2_naming_the_file(tmp_path, capsys, monkeypatch):
    import os

    _, argv = image_folder(tmp_path)
    real_replace = os.replace

    def no_space(source, target):
        if str(target).endswith(".safetensors"):
            raise OSError(errno.ENOSPC, "No space left on device", str(target))
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", no_space)
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == USER_ERROR_EXIT and len(err) == 1, err
    assert "No space left on device" in err[0] and ".safetensors" in err[0] and "free disk space" in err[0]
    assert not (tmp_path / "run" / "data" / "manifest.jsonl").exists()


def test_a_bug_is_one_line_with_a_log_of_its_traceback_and_exit_1(tmp_path, capsys, monkeypatch):
    import radsynth.pipelines.data.ingest as ingest_module

    _, argv = image_folder(tmp_path)

    def broken(*args, **kwargs):
        raise KeyError("an internal mistake")

    monkeypatch.setattr(ingest_module, "summarize", broken)
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == BUG_EXIT and len(err) == 1 and err[0].startswith("radsynth: internal error: KeyError")
    log = Path(err[0].rsplit("the traceback is in ", 1)[1])
    assert log.is_file() and "Traceback" in log.read_text() and "an internal mistake" in log.read_text()
    assert log.parent == tmp_path / "run" / "logs"

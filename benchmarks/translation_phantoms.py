"""CT <-> MRI translation: the diffusion bridge against the CycleGAN baseline, on phantoms with pixel truth or on real MRI.

    python benchmarks/translation_phantoms.py CONFIG --out DIR [--cases N] [--seed S] [--mri-source phantom|real]
                                              [--ct-source phantom|real] [--directions ct:mri mri:ct]
                                              [key=value ...]

CONFIG is a model trained on both modalities (configs/translate-abdomen.yaml or translate-chaos.yaml after
`radsynth train`). A paired test cohort that no model saw (phantom seed S, N cases) is written twice as MSD folders,
as ct_torso (CT) and as mri_torso (its T2-SPIR rendering, voxel for voxel the same anatomy), each under the other's
case ids as well, so either can be the source and the other its truth. With ``--mri-source real`` the MRI source is
the build's own test split of real MRI (translate-chaos: CHAOS cases no model trained on), and no direction has
pixel truth (the phantom rendering is not the MRI the model learnt). With ``--ct-source real`` the shared real torso CT
(``ct-torso-example``: one patient, TotalSegmentator's reference labels) joins the CT phantoms as a source case, so
CT -> MRI is also measured on a patient's anatomy rather than the phantoms' ellipsoids: its own Dice ratios are read
from its per-sample row (one case cannot be scored alone). For each direction (ct->mri, mri->ct) and
method (diffusion, cycle_gan) it runs, one at a time:

    radsynth translate CONFIG translation.method=M --from A --to B --source DIR/A --out DIR/A-to-B-M
    radsynth evaluate CONFIG scoring.modality=B [scoring.paired_truth=DIR/B-as-A] --samples ... --out ...

and reads from each scorecard: label preservation (segmenter Dice on the translations against their carried labels,
over its Dice on real target images: per label), realism against the real target modality (coverage and FD in each
feature space, with their real floors), the pixel truth (SSIM, PSNR) and the privacy verdict (against the target's
and the source modality's training patients). Writes DIR/translation_phantoms.json and prints a markdown table and
the machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from build_scores import interval, machine

from radsynth.configs import load_config
from radsynth.pipelines.data.adapters.phantom import MSD_CHANNEL_NAMES, write_msd_folder
from radsynth.pipelines.data.io import read_image, write_nifti
from radsynth.pipelines.data.phantoms import kind_module
from radsynth.pipelines.scoring.loading import split_records
from radsynth.pipelines.translation import translation_id

KINDS = {"ct": "ct_torso", "mri": "mri_torso"}
SHARED_DATA = Path(os.environ.get("RADSYNTH_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
LABELS = ("liver", "spleen", "right_kidney", "left_kidney")
PHANTOM_VALUES = {name: value for value, name in kind_module("ct_torso").LABEL_NAMES.items()}


def label_values(config) -> dict[str, int]:
    """Each label's value in the model's vocabulary: the pool's (data.label_names) when it names one, else the
    phantoms' (translate-abdomen pools phantoms alone)."""
    if config.data.label_names:
        return {name: value for value, name in config.data.label_names.items()}
    return PHANTOM_VALUES


def radsynth(*arguments: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "radsynth.flows.cli", *arguments, "--json"], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def run_arm(config: str, out: Path, folders: dict[str, Path], source: str, target: str, method: str,
            overrides: list[str], paired: bool) -> dict:
    samples, scored = out / f"{source}-to-{target}-{method}", out / f"eval-{source}-to-{target}-{method}"
    translate_s = radsynth("translate", config, *overrides, f"translation.method={method}", "--from", source,
                           "--to", target, "--source", str(folders[source]), "--out", str(samples))
    truth = [f"scoring.paired_truth={out / f'{target}-as-{source}'}"] if paired else []
    evaluate_s = radsynth("evaluate", config, *overrides, f"scoring.modality={target}", *truth, "--samples",
                          str(samples), "--out", str(scored))
    card = json.loads((scored / "scorecard.json").read_text())
    return {"direction": f"{source}->{target}", "method": method, "source": str(folders[source]), "scored": str(scored),
            "translate_seconds": round(translate_s, 1), "evaluate_seconds": round(evaluate_s, 1),
            "sizes": card["sizes"], "privacy": card["verdicts"]["privacy"], "rows": card["rows"]}


def write_real_split(root: Path, config, split: str, modality: str) -> Path:
    """The build's real cases of one split and modality as an MSD folder (links to the files the manifest names)."""
    records = split_records(config, split, modality)
    if not records:
        raise SystemExit(f"{config.output_dir}: no {modality} cases in the {split} split")
    for record in records:
        for folder, path in (("imagesTr", record.image), ("labelsTr", record.label)):
            if path is not None:
                link = root / folder / Path(path).name
                link.parent.mkdir(parents=True, exist_ok=True)
                link.unlink(missing_ok=True)
                link.symlink_to(Path(path).resolve())
    meta = {"name": f"{config.data.name}-{split}-{modality}", "modality": {"0": MSD_CHANNEL_NAMES[modality]},
            "labels": {str(value): name for value, name in records[0].label_names.items()}}
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return root


# TotalSegmentator's 117-class reference: the values of the organs the benchmark reads.
CT_EXAMPLE_LABELS = {1: "spleen", 2: "right_kidney", 3: "left_kidney", 5: "liver"}
CT_EXAMPLE = "totalseg_example"


def add_ct_example(root: Path, shared_data: Path) -> None:
    """Adds the shared real torso CT (one patient no model trained on) to the CT phantoms' MSD folder ``root``, its
    organs renumbered into the folder's vocabulary (its other 113 classes become background). One case cannot be
    scored alone (evaluate needs two), so it is scored among the phantoms and read from its own per-sample row."""
    example = shared_data / "ct-torso-example"
    values = {name: int(value) for value, name in json.loads((root / "dataset.json").read_text())["labels"].items()}
    label = read_image(example / "labelsTr" / f"{CT_EXAMPLE}.nii.gz")
    renumbered = np.zeros(label.array.shape, np.uint8)
    for value, name in CT_EXAMPLE_LABELS.items():
        renumbered[np.asarray(label.array) == value] = values[name]
    write_nifti(root / "labelsTr" / f"{CT_EXAMPLE}.nii.gz", renumbered, label.affine)
    link = root / "imagesTr" / f"{CT_EXAMPLE}.nii.gz"
    link.unlink(missing_ok=True)
    link.symlink_to((example / "imagesTr" / link.name).resolve(strict=True))


def example_row(result: dict, values: dict[str, int]) -> dict | None:
    """The real CT case's own Dice per label over the real target ceiling (per_sample.csv of its arm)."""
    with open(Path(result["scored"]) / "per_sample.csv") as handle:
        sample = next((r for r in csv.DictReader(handle) if r["sample_id"] == translation_id(CT_EXAMPLE)), None)
    if sample is None:
        return None
    ratios = {}
    for label in LABELS:
        column = next((f"mask_dice_{key}" for key in (label, values[label]) if f"mask_dice_{key}" in sample), None)
        ceiling = dice_ratio_row(result, label, values)
        dice = float(sample[column]) if column and sample[column] not in ("", "nan") else None
        real = ceiling and ceiling["reference_value"]
        ratios[label] = round(dice / real, 3) if dice is not None and real else None
    return ratios


def row(result: dict, section: str, metric: str, space: str = "-", stratum: str = "all") -> dict | None:
    return next((r for r in result["rows"] if (r["section"], r["metric"], r["feature_space"], r["stratum"])
                 == (section, metric, space, stratum)), None)


def dice_ratio_row(result: dict, label: str, values: dict[str, int]) -> dict | None:
    """The label's mask-Dice ratio row: the scorecard names a label when the real data's vocabulary does, else
    gives its value."""
    return (row(result, "adherence", "mask_dice_ratio", "segmenter (real train)", f"label {label}")
            or row(result, "adherence", "mask_dice_ratio", "segmenter (real train)", f"label {values[label]}"))


def table(results: list[dict], values: dict[str, int]) -> list[str]:
    spaces = sorted({r["feature_space"] for res in results for r in res["rows"] if r["metric"] == "coverage"})
    header = (["direction", "method", *[f"Dice ratio {label}" for label in LABELS], "SSIM", "PSNR dB"]
              + [f"coverage {space}" for space in spaces] + ["privacy", "translate s"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for res in results:
        cells = [res["direction"], res["method"]]
        for label in LABELS:
            dice = dice_ratio_row(res, label, values)
            cells.append(f"{interval(dice)} (real {dice['reference_value']:.2f})" if dice else "n/a")
        cells += [interval(row(res, "translation", "pixel_truth_ssim", "paired rendering")),
                  interval(row(res, "translation", "pixel_truth_psnr", "paired rendering"))]
        for space in spaces:
            coverage = row(res, "realism", "coverage", space)
            cells.append(f"{interval(coverage)} (floor {coverage['reference_value']:.2f})" if coverage else "n/a")
        cells.append("passed" if res["privacy"]["passed"] else "refused: " + "; ".join(
            reason.split(":")[0] for reason in res["privacy"]["reasons"]))
        cells.append(f"{res['translate_seconds']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=["diffusion", "cycle_gan"])
    parser.add_argument("--mri-source", choices=["phantom", "real"], default="phantom",
                        help="the MRI -> CT source: mri_torso phantoms (with pixel truth) or the build's real MRI "
                             "test split (none)")
    parser.add_argument("--ct-source", choices=["phantom", "real"], default="phantom",
                        help="the CT -> MRI source: ct_torso phantoms, or those and the shared real torso CT (one "
                             "patient, TotalSegmentator's reference labels), without pixel truth")
    parser.add_argument("--shared-data", type=Path, default=SHARED_DATA)
    parser.add_argument("--directions", nargs="+", choices=["ct:mri", "mri:ct"], default=["ct:mri", "mri:ct"])
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    config = load_config(args.config, args.overrides)
    shape = config.data.preprocess.target_shape
    for modality in KINDS:
        for ids_of in KINDS:
            write_msd_folder(args.out / f"{modality}-as-{ids_of}", KINDS[modality], args.cases, args.seed, shape,
                             ids_of=KINDS[ids_of])
    folders = {modality: args.out / f"{modality}-as-{modality}" for modality in KINDS}
    if args.mri_source == "real":
        folders["mri"] = write_real_split(args.out / "mri-real-test", config, "test", "mri")
    for path in (folders["ct"] / "imagesTr" / f"{CT_EXAMPLE}.nii.gz", folders["ct"] / "labelsTr" / f"{CT_EXAMPLE}.nii.gz"):
        path.unlink(missing_ok=True)  # an earlier --ct-source real run into the same --out
    if args.ct_source == "real":
        add_ct_example(folders["ct"], args.shared_data)

    def paired(source: str) -> bool:
        """Pixel truth is the other phantom rendering: for phantom sources, in a model that learnt phantom MRI."""
        return args.mri_source == "phantom" and (source == "mri" or args.ct_source == "phantom")

    results = [run_arm(args.config, args.out, folders, source, target, method, args.overrides, paired(source))
               for source, target in (direction.split(":") for direction in args.directions)
               for method in args.methods]
    values = label_values(config)
    if args.ct_source == "real":
        for result in results:
            if result["direction"].startswith("ct->"):
                result["real_ct_case"] = example_row(result, values)
    summary = {"config": args.config, "overrides": args.overrides, "cases": args.cases, "seed": args.seed,
               "mri_source": args.mri_source, "ct_source": args.ct_source,
               "shared_data": str(args.shared_data), "directions": args.directions, "machine": machine(), "results": results}
    (args.out / "translation_phantoms.json").write_text(json.dumps(summary, indent=2))
    print("\n".join(table(results, values)))
    for result in results:
        if "real_ct_case" in result:
            ratios = result["real_ct_case"] or {}
            print(f"{result['direction']} {result['method']}: the CT rows hold {args.cases} phantoms and the real CT "
                  f"case ({CT_EXAMPLE}); its own Dice ratios: "
                  + (", ".join(f"{label} {ratio}" for label, ratio in ratios.items()) or "not scored"))
    print(json.dumps({"machine": summary["machine"], "cases": args.cases}))


if __name__ == "__main__":
    main()

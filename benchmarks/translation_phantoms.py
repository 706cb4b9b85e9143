"""CT <-> MRI translation on the torso phantoms: the diffusion bridge against the CycleGAN baseline, with pixel truth.

    python benchmarks/translation_phantoms.py CONFIG --out DIR [--cases N] [--seed S] [key=value ...]

CONFIG is a model trained on both modalities (configs/translate-abdomen.yaml after `radsynth train`). A paired test
cohort that no model saw (phantom seed S, N cases) is written twice as MSD folders, as ct_torso (CT) and as
mri_torso (its T2-SPIR rendering, voxel for voxel the same anatomy), each under the other's case ids as well, so
either can be the source and the other its truth. For each direction (ct->mri, mri->ct) and method (diffusion,
cycle_gan) it runs, one at a time:

    radsynth translate CONFIG translation.method=M --from A --to B --source DIR/A --out DIR/A-to-B-M
    radsynth evaluate CONFIG scoring.modality=B scoring.paired_truth=DIR/B-as-A --samples ... --out ...

and reads from each scorecard: label preservation (segmenter Dice on the translations against their carried labels,
over its Dice on real target images: per label), realism against the real target modality (coverage and FD in each
feature space, with their real floors) and the pixel truth (SSIM, PSNR). Writes DIR/translation_phantoms.json and
prints a markdown table and the machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from build_scores import interval, machine

from radsynth.configs import load_config
from radsynth.pipelines.data.adapters.phantom import write_msd_folder
from radsynth.pipelines.data.phantoms import kind_module
from radsynth.pipelines.translation import cycle_gan_dir

KINDS = {"ct": "ct_torso", "mri": "mri_torso"}
LABELS = ("liver", "spleen", "right_kidney", "left_kidney")
PHANTOM_VALUES = {name: value for value, name in kind_module("ct_torso").LABEL_NAMES.items()}


def radsynth(*arguments: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "radsynth.flows.cli", *arguments, "--json"], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def run_arm(config: str, out: Path, source: str, target: str, method: str, overrides: list[str]) -> dict:
    samples, scored = out / f"{source}-to-{target}-{method}", out / f"eval-{source}-to-{target}-{method}"
    translate_s = radsynth("translate", config, *overrides, f"translation.method={method}", "--from", source,
                           "--to", target, "--source", str(out / f"{source}-as-{source}"), "--out", str(samples))
    # The white-box privacy probes (membership inference, round-trip copies) ask the model that made the samples:
    # the diffusion model, never for the CycleGAN's (its folder holds no diffusion pipeline, so they are skipped).
    generator = [] if method == "diffusion" else ["--model", str(cycle_gan_dir(load_config(config, overrides),
                                                                               source, target))]
    evaluate_s = radsynth("evaluate", config, *overrides, f"scoring.modality={target}",
                          f"scoring.paired_truth={out / f'{target}-as-{source}'}", "--samples", str(samples),
                          "--out", str(scored), *generator)
    card = json.loads((scored / "scorecard.json").read_text())
    return {"direction": f"{source}->{target}", "method": method, "translate_seconds": round(translate_s, 1),
            "evaluate_seconds": round(evaluate_s, 1), "sizes": card["sizes"], "rows": card["rows"]}


def row(result: dict, section: str, metric: str, space: str = "-", stratum: str = "all") -> dict | None:
    return next((r for r in result["rows"] if (r["section"], r["metric"], r["feature_space"], r["stratum"])
                 == (section, metric, space, stratum)), None)


def table(results: list[dict]) -> list[str]:
    spaces = sorted({r["feature_space"] for res in results for r in res["rows"] if r["metric"] == "coverage"})
    header = (["direction", "method", *[f"Dice ratio {label}" for label in LABELS], "SSIM", "PSNR dB"]
              + [f"coverage {space}" for space in spaces] + ["translate s"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for res in results:
        cells = [res["direction"], res["method"]]
        for label in LABELS:
            # The scorecard names a label when the real data's vocabulary does, else gives its value.
            dice = (row(res, "adherence", "mask_dice_ratio", "segmenter (real train)", f"label {label}")
                    or row(res, "adherence", "mask_dice_ratio", "segmenter (real train)",
                           f"label {PHANTOM_VALUES[label]}"))
            cells.append(f"{interval(dice)} (real {dice['reference_value']:.2f})" if dice else "n/a")
        cells += [interval(row(res, "translation", "pixel_truth_ssim", "paired rendering")),
                  interval(row(res, "translation", "pixel_truth_psnr", "paired rendering"))]
        for space in spaces:
            coverage = row(res, "realism", "coverage", space)
            cells.append(f"{interval(coverage)} (floor {coverage['reference_value']:.2f})" if coverage else "n/a")
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
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    shape = load_config(args.config, args.overrides).data.preprocess.target_shape
    for modality in KINDS:
        for ids_of in KINDS:
            write_msd_folder(args.out / f"{modality}-as-{ids_of}", KINDS[modality], args.cases, args.seed, shape,
                             ids_of=KINDS[ids_of])
    results = [run_arm(args.config, args.out, source, target, method, args.overrides)
               for source, target in (("ct", "mri"), ("mri", "ct")) for method in args.methods]
    summary = {"config": args.config, "overrides": args.overrides, "cases": args.cases, "seed": args.seed,
               "machine": machine(), "results": results}
    (args.out / "translation_phantoms.json").write_text(json.dumps(summary, indent=2))
    print("\n".join(table(results)))
    print(json.dumps({"machine": summary["machine"], "cases": args.cases}))


if __name__ == "__main__":
    main()

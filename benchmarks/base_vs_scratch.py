"""Fine-tuning from radsynth's own multi-dataset base against training from scratch, at equal diffusion steps.

    python benchmarks/base_vs_scratch.py CONFIG --base MODEL_DIR --out DIR --steps N [key=value ...]

Two full builds of CONFIG (the same overrides, the same conditioning), one at a time:
- scratch: ``radsynth build CONFIG diffusion.max_steps=N``: its own autoencoder, then N diffusion steps;
- base: ``radsynth build CONFIG finetune.from=MODEL_DIR finetune.method=full finetune.max_steps=N``: the base's
  autoencoder and text encoder, its UNet fine-tuned for N steps (the same UNet step cost).
From each scorecard: realism (coverage in each feature space with its real floor), memorisation (DCR share in the
gate's space, copy rate, membership AUC, how many distinct training images are the samples' nearest neighbours),
adherence per prompted attribute, the release gate's verdict and the build's time. Writes DIR/base_vs_scratch.json
and .png and prints one JSON object with the machine.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from build_scores import error_bars, figure_arguments, interval, machine, pick, run_build, save_figure

ARMS = ("scratch", "base")


def run_arm(arm: str, config: str, base: Path, out: Path, steps: int, overrides: list[str]) -> dict:
    if arm == "scratch":
        return {"arm": arm, **run_build(config, out / arm, [*overrides, f"diffusion.max_steps={steps}"], arm)}
    return {"arm": arm, **run_build(config, out / arm, [*overrides, f"finetune.from={base}", "finetune.method=full",
                                                        f"finetune.max_steps={steps}"], arm)}


def table(results: list[dict]) -> list[str]:
    spaces = sorted({row["feature_space"] for r in results for row in r["rows"] if row["metric"] == "coverage"})
    attributes = sorted({row["stratum"] for r in results for row in r["rows"] if row["section"] == "adherence"})
    header = (["arm", "build s", "released"] + [f"coverage {space}" for space in spaces]
              + ["DCR share (self-sup.)", "copy rate", "membership AUC", "distinct NN (pixels)"]
              + [f"adherence {a}" for a in attributes])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        coverage = [pick(r, "realism", "coverage", space) for space in spaces]
        cells = [r["arm"], f"{r['build_seconds']:.0f}", "yes" if r["build_exit"] == 0 else "no (gate)"]
        cells += [f"{interval(row)} (floor {row['reference_value']:.3g})" if row else "n/a" for row in coverage]
        nn = r["nearest_neighbours"]["pixel"]
        cells += [interval(pick(r, "privacy", "dcr_share", "self_supervised")), interval(pick(r, "privacy", "copy_rate")),
                  interval(pick(r, "privacy", "membership_inference_auc")), f"{nn['distinct']}/{nn['samples']}"]
        cells += [interval(next((row for row in r["rows"] if row["section"] == "adherence" and row["stratum"] == a),
                                None)) for a in attributes]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot(results: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spaces = sorted({row["feature_space"] for r in results for row in r["rows"] if row["metric"] == "coverage"})
    figure, (realism, privacy) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / len(results)
    for i, r in enumerate(results):
        rows = [pick(r, "realism", "coverage", space) or {} for space in spaces]
        realism.bar([j + i * width for j in range(len(spaces))], [row.get("value", math.nan) for row in rows],
                    width, label=r["arm"])
    floors = [(pick(results[0], "realism", "coverage", space) or {}).get("reference_value") for space in spaces]
    realism.scatter([j + 0.4 - width / 2 for j in range(len(spaces))], [math.nan if f is None else f for f in floors],
                    marker="_", s=600, color="black", label="real floor")
    realism.set(xticks=[j + 0.4 - width / 2 for j in range(len(spaces))], xticklabels=spaces, title="coverage")
    realism.legend(fontsize=7)
    metrics = [("dcr_share", "self_supervised", "DCR share"), ("copy_rate", None, "copy rate"),
               ("membership_inference_auc", None, "membership AUC")]
    for i, r in enumerate(results):
        values, below, above = error_bars([pick(r, "privacy", metric, space) or {} for metric, space, _ in metrics])
        privacy.bar([j + i * width for j in range(len(metrics))], values, width, yerr=[below, above], capsize=3,
                    label=r["arm"])
    privacy.axhline(0.5, color="grey", linewidth=0.8)
    privacy.set(xticks=[j + 0.4 - width / 2 for j in range(len(metrics))], xticklabels=[m[2] for m in metrics],
                title="memorisation (lower is more private; 0.5: chance)")
    privacy.legend(fontsize=7)
    return save_figure(figure, path)


def main() -> None:
    parser = figure_arguments(__doc__)
    parser.add_argument("--steps", type=int, required=True, help="diffusion steps of each arm")
    parser.add_argument("--arms", default=",".join(ARMS), help="which to (re)build; the others are read from "
                        "DIR/base_vs_scratch.json")
    parser.add_argument("--replot", action="store_true", help="redraw from DIR/base_vs_scratch.json")
    args, overrides = parser.parse_known_args()
    saved = args.out / "base_vs_scratch.json"
    report = json.loads(saved.read_text()) if saved.is_file() else {"results": []}
    if not args.replot:
        built = {arm: run_arm(arm, args.config, args.base.resolve(), args.out, args.steps, overrides)
                 for arm in args.arms.split(",")}
        earlier = {r["arm"]: r for r in report["results"]}
        report = {"config": args.config, "base": str(args.base), "steps": args.steps, "overrides": overrides,
                  "results": [built.get(arm) or earlier[arm] for arm in ARMS if arm in built or arm in earlier],
                  "machine": machine()}
        args.out.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(report, indent=1))
    plot(report["results"], args.out / "base_vs_scratch.png")
    print("\n".join(table(report["results"])))
    print(json.dumps(report))


if __name__ == "__main__":
    main()

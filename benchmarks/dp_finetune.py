"""Quality against epsilon: DP fine-tunes of one pretrained base, built and scored as radsynth builds them.

    python benchmarks/dp_finetune.py CONFIG --base MODEL_DIR --out DIR [--epsilons 1,4,10,inf] [key=value ...]

For each epsilon, ``radsynth build CONFIG finetune.from=MODEL_DIR finetune.privacy.epsilon=EPS`` (``inf``: the
ordinary, non-private fine-tune) runs in DIR/eps-EPS: the fine-tune, sampling, the scorecard and the gate. Then,
from each scorecard: realism (coverage in every feature space, with the real floor), adherence per prompted
attribute, membership-inference AUC (with chance's interval: the real-vs-real reference) and DCR share. Writes
DIR/dp_quality.json and DIR/dp_quality.png (quality against epsilon), adds the figure to every fine-tuned model's
card, and prints one JSON object with the machine. Runs one build at a time (torch on a small CPU must not share).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from build_scores import error_bars, figure_arguments, interval, machine, pick, run_build, save_figure


def build(config: str, base: Path, out: Path, epsilon: float, overrides: list[str]) -> dict:
    private = [] if math.isinf(epsilon) else [f"finetune.privacy.epsilon={epsilon:g}"]
    result = run_build(config, out, [f"finetune.from={base}", *private, *overrides], f"at epsilon {epsilon:g}")
    models = sorted(out.glob("model-finetune-*"))
    guarantee = json.loads((models[-1] / "model_index.json").read_text()).get("differential_privacy")
    return {"epsilon": epsilon, **result, "guarantee": guarantee, "model": str(models[-1])}


def plot(results: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["inf" if math.isinf(r["epsilon"]) else f"{r['epsilon']:g}" for r in results]
    x = list(range(len(results)))
    spaces = sorted({row["feature_space"] for r in results for row in r["rows"]
                     if row["metric"] == "coverage" and row["section"] == "realism"})
    figure, (realism, privacy) = plt.subplots(1, 2, figsize=(10, 4))
    for space in spaces:
        values = [(pick(r, "realism", "coverage", space) or {}).get("value") for r in results]
        realism.plot(x, [math.nan if v is None else v for v in values], marker="o", label=f"coverage ({space})")
    attributes = sorted({row["stratum"] for r in results for row in r["rows"] if row["section"] == "adherence"})
    for attribute in attributes:
        values = [next((row["value"] for row in r["rows"] if row["section"] == "adherence"
                        and row["stratum"] == attribute), math.nan) for r in results]
        realism.plot(x, values, marker="s", linestyle="--", label=f"adherence ratio ({attribute})")
    realism.set(xticks=x, xticklabels=labels, xlabel="epsilon (per patient)", title="quality")
    realism.legend(fontsize=7)
    for metric, name, space in (("membership_inference_auc", "membership AUC", None),
                                ("dcr_share", "DCR share (self-supervised, the gate's)", "self_supervised")):
        values, below, above = error_bars([pick(r, "privacy", metric, space) or {} for r in results])
        privacy.errorbar(x, values, yerr=[below, above], marker="o", capsize=3, label=name)
    privacy.axhline(0.5, color="grey", linewidth=0.8)
    privacy.set(xticks=x, xticklabels=labels, xlabel="epsilon (per patient)", title="empirical privacy (0.5: chance)")
    privacy.legend(fontsize=7)
    return save_figure(figure, path)


def main() -> None:
    parser = figure_arguments(__doc__)
    parser.add_argument("--epsilons", default="1,4,10,inf", help="comma-separated; inf: not private")
    parser.add_argument("--replot", action="store_true", help="redraw the figure and cards from DIR/dp_quality.json")
    args, overrides = parser.parse_known_args()
    if args.replot:
        results = json.loads((args.out / "dp_quality.json").read_text())["results"]
    else:
        epsilons = [float(value) for value in args.epsilons.split(",")]
        results = [build(args.config, args.base.resolve(), args.out / f"eps-{e:g}", e, overrides) for e in epsilons]
    args.out.mkdir(parents=True, exist_ok=True)
    figure = plot(results, args.out / "dp_quality.png")
    from radsynth.pipelines.model_card import add_card_section

    table = ["| epsilon | spent | membership AUC | DCR share | build s |", "|---|---|---|---|---|"]
    for r in results:
        auc = pick(r, "privacy", "membership_inference_auc") or {}
        dcr = pick(r, "privacy", "dcr_share", "self_supervised") or {}
        spent = (r["guarantee"] or {}).get("epsilon")
        table.append(f"| {r['epsilon']:g} | {'n/a' if spent is None else f'{spent:.3g}'} | {interval(auc)} | "
                     f"{interval(dcr)} | {r['build_seconds']} |")
    for r in results:
        card_figure = Path(r["model"]) / "dp_quality.png"
        card_figure.write_bytes(figure.read_bytes())
        add_card_section(Path(r["model"]), "Quality against epsilon",
                         ["Fine-tunes of the same base at each epsilon, built and scored alike "
                          "(benchmarks/dp_finetune.py):", "", *table, "", "![quality against epsilon](dp_quality.png)"])
    if args.replot:
        return
    report = {"config": args.config, "base": str(args.base), "overrides": overrides, "results": results,
              "machine": machine()}
    (args.out / "dp_quality.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report))


if __name__ == "__main__":
    main()

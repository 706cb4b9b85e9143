"""Seconds per image against quality for every sampler of one trained model, and its distilled student.

    python benchmarks/sampler_speed.py CONFIG [key=value ...] [--n 64] [--student-steps 1 2 4] [--out DIR] [--json]

Ingests, trains and distils (each a no-op when current), then draws the same N samples (same prompts, same
per-sample seeds) with DDPM-1000, DDIM-50, the base model at 10 / 4 / 2 steps (DDIM and DPM-Solver++) and the
student at its steps, timing sampling + decoding per image in one process, one sampler after another. Quality
is the scorecard's: Frechet distance and coverage in the self-supervised space (an encoder trained on train +
holdout, as ``radsynth evaluate`` does) against the training set, next to the real-vs-real floor (unseen real
images at the same n) with its patient-level bootstrap interval. Writes ``sampler_speed.json`` and
``sampler_speed.png`` (quality against seconds per image) to ``--out`` and puts the table and plot into the
student's model card. The last stdout line is one JSON object: ``speedup_vs_ddpm1000``, ``student_steps``,
``fd_student``, ``fd_real_floor_ci_high`` and every row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from radsynth.configs import load_config  # noqa: E402
from radsynth.pipelines.data.ingest import ingest  # noqa: E402
from radsynth.pipelines.distillation import distill  # noqa: E402
from radsynth.pipelines.model_card import add_card_section  # noqa: E402
from radsynth.pipelines.sampling.generate import load_pipeline, sampling_conditions  # noqa: E402
from radsynth.pipelines.scoring import realism  # noqa: E402
from radsynth.pipelines.scoring.features import SelfSupervisedEncoder  # noqa: E402
from radsynth.pipelines.scoring.loading import cached_split  # noqa: E402
from radsynth.pipelines.training import student_dir, train, trained_model_dir  # noqa: E402

BASE_SAMPLERS = [("ddpm", 1000), ("ddim", 50), ("ddim", 10), ("dpm_solver", 10), ("ddim", 4), ("dpm_solver", 4),
                 ("ddim", 2), ("dpm_solver", 2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--n", type=int, default=64, help="samples per sampler")
    parser.add_argument("--student-steps", type=int, nargs="*", default=None,
                        help="student step counts to measure (default: distill.steps)")
    parser.add_argument("--out", default=None, help="folder for sampler_speed.json/png (default: <output_dir>/bench)")
    parser.add_argument("--json", action="store_true", help="only the JSON line on stdout")
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    say = (lambda *_: None) if args.json else print
    out = Path(args.out or config.output_dir / "bench")
    out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    ingest(config, progress=False)
    train(config, progress=False)
    distilled = distill(config, progress=False)
    preparation_seconds = time.perf_counter() - started

    conditions = sampling_conditions(config)
    chosen = [conditions[i % len(conditions)] for i in range(args.n)]
    teacher = load_pipeline(trained_model_dir(config), config, progress=False, pairs=False)
    student = load_pipeline(student_dir(config), config, progress=False, pairs=False)
    for pipeline in (teacher, student):
        pipeline.set_progress_bar_config(disable=True)
    guidance = config.sampling.guidance_scale
    runs = [(f"{name}-{steps}", teacher, teacher.base_scheduler(name), steps, guidance) for name, steps in BASE_SAMPLERS]
    for steps in args.student_steps or [config.distill.steps]:
        runs.append((f"student-{steps}", student, student.scheduler, steps, 1.0))

    features, floors, rows = _Features(config), None, []
    for name, pipeline, scheduler, steps, scale in runs:
        pipeline.scheduler = scheduler
        images, seconds = _sample(pipeline, chosen, steps, scale, config)
        # The floor's interval once (it does not depend on the samples); point values for every sampler.
        compared = features.compare(images, n_boot=0 if floors else config.scoring.bootstrap_samples)
        floors = floors or _floor(compared["real_floor"])
        quality = {"fd": compared["synthetic"]["frechet_distance"].value,
                   "coverage": compared["synthetic"]["coverage"].value}
        rows.append({"sampler": name, "steps": steps, "guidance_scale": scale,
                     "network_calls_per_image": steps * (2 if scale > 1 else 1),
                     "seconds_per_image": seconds / len(images), **quality})
        say(f"{name:>16}: {rows[-1]['seconds_per_image']:.4f} s/image, FD {quality['fd']:.4g}, "
            f"coverage {quality['coverage']:.3f}")
    reference = next(row for row in rows if row["sampler"] == "ddpm-1000")
    for row in rows:
        row["speedup_vs_ddpm1000"] = reference["seconds_per_image"] / row["seconds_per_image"]
    headline = next(row for row in rows if row["sampler"] == f"student-{config.distill.steps}")
    result = {
        "config": args.config, "overrides": args.overrides, "n": args.n,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
                   f"{torch.get_num_threads()}, {'cuda ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}",
        "preparation_seconds": round(preparation_seconds, 1), "distill_steps": distilled.steps,
        "speedup_vs_ddpm1000": headline["speedup_vs_ddpm1000"], "student_steps": headline["steps"],
        "fd_student": headline["fd"], "coverage_student": headline["coverage"], **floors,
        "fd_student_inside_real_interval": bool(headline["fd"] <= floors["fd_real_floor_ci_high"]),
        "rows": rows,
    }
    (out / "sampler_speed.json").write_text(json.dumps(result, indent=2))
    plot = _plot(rows, floors, out / "sampler_speed.png")
    shutil.copy(plot, student_dir(config) / plot.name)
    add_card_section(student_dir(config), "Speed and quality", _card_lines(result, plot.name))
    print(json.dumps(result))


class _Features:
    """The self-supervised space of ``radsynth evaluate``, fitted once on the real side."""

    def __init__(self, config):
        self.train, holdout, test = (cached_split(config, split) for split in ("train", "holdout", "test"))
        self.unseen_groups = holdout.groups + test.groups
        self.encoder = SelfSupervisedEncoder(self.train.spatial_dims, seed=config.runtime.seed)
        self.encoder.fit(np.concatenate([self.train.images, holdout.images]),
                         steps=config.scoring.self_supervised_steps)
        self.train_features = self.encoder.extract(self.train.images)
        self.unseen_features = self.encoder.extract(np.concatenate([holdout.images, test.images]))
        self.seed = config.runtime.seed

    def compare(self, images: np.ndarray, n_boot: int) -> dict:
        """FD and coverage of the images against train, next to unseen real images at the same n (the floor)."""
        def metrics(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
            # the scorecard's names, so the intervals are cut to what each metric can take (FD >= 0)
            return {"frechet_distance": realism.frechet_distance_features(a, b),
                    "coverage": realism.density_coverage(b, a)[1]}

        return realism.with_real_floor(metrics, self.encoder.extract(images), self.train_features,
                                       self.unseen_features, None, self.train.groups, self.unseen_groups,
                                       n_boot=n_boot, seed=self.seed)


def _floor(floor: dict) -> dict:
    fd = floor["frechet_distance"]
    return {"fd_real_floor": fd.value, "fd_real_floor_ci_low": fd.ci_low,
            "fd_real_floor_ci_high": fd.ci_high, "coverage_real_floor": floor["coverage"].value,
            "coverage_real_floor_ci_low": floor["coverage"].ci_low}


@torch.no_grad()
def _sample(pipeline, chosen, steps: int, guidance: float, config) -> tuple[np.ndarray, float]:
    """All samples in the config's batches, each from its own seed (sample index i), timed as a whole."""
    images, batch, elapsed = [], config.sampling.batch_size, 0.0
    for start in range(0, len(chosen), batch):
        rows = chosen[start:start + batch]
        generators = [torch.Generator().manual_seed(config.runtime.seed * 100_003 + start + i) for i in range(len(rows))]
        began = time.perf_counter()
        output = pipeline([r.prompt for r in rows], conditions=[r.conditions for r in rows], num_inference_steps=steps,
                          guidance_scale=guidance, generator=generators, output_type="np")
        elapsed += time.perf_counter() - began
        images.append(np.asarray(output.images)[:, 0])
    return np.concatenate(images), elapsed


def _plot(rows: list[dict], floors: dict, path: Path) -> Path:
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for axis, metric, low, high in ((axes[0], "fd", "fd_real_floor_ci_low", "fd_real_floor_ci_high"),
                                    (axes[1], "coverage", "coverage_real_floor_ci_low", None)):
        axis.axhspan(floors[low], floors[high] if high else floors["coverage_real_floor"], color="tab:green", alpha=0.2,
                     label="real vs real" + (" (95% CI)" if high else " (CI low to value)"))
        for row in rows:
            student = row["sampler"].startswith("student")
            axis.scatter(row["seconds_per_image"], row[metric], marker="*" if student else "o",
                         s=120 if student else 40, color="tab:red" if student else "tab:blue")
            axis.annotate(row["sampler"], (row["seconds_per_image"], row[metric]), fontsize=7,
                          xytext=(3, 3), textcoords="offset points")
        axis.set_xscale("log")
        axis.set_xlabel("seconds per image (decode included)")
        axis.set_ylabel({"fd": "Frechet distance to train (lower is better)", "coverage": "coverage (higher)"}[metric])
        axis.legend(fontsize=7)
    figure.suptitle("Samplers of one model: quality against time (self-supervised space)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def _card_lines(result: dict, plot: str) -> list[str]:
    lines = [f"Measured by `benchmarks/sampler_speed.py` on {result['machine']}, n = {result['n']} samples per sampler "
             f"(same prompts and seeds). Real-vs-real FD {result['fd_real_floor']:.4g} (95% CI "
             f"{result['fd_real_floor_ci_low']:.4g} to {result['fd_real_floor_ci_high']:.4g}).", "",
             "| sampler | network calls / image | s / image | speed-up vs DDPM-1000 | FD | coverage |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['sampler']} | {r['network_calls_per_image']} | {r['seconds_per_image']:.4f} | "
              f"{r['speedup_vs_ddpm1000']:.1f}x | {r['fd']:.4g} | {r['coverage']:.3f} |" for r in result["rows"]]
    return [*lines, "", f"![quality against seconds per image]({plot})"]


if __name__ == "__main__":
    main()

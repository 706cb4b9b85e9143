"""Privacy-aware checkpoint selection for the diffusion model: the frontier points of a training run, the weights
of the points worth keeping, and the choice (``scoring.frontier`` scores and chooses).

At each point the inference (EMA) weights draw ``diffusion.frontier_samples`` images under training prompts and
are scored; the trained modules' weights are saved (safetensors) whenever a point is the best private one so far,
so the choice survives a kill: a resumed run drops the points and weights from its first point on and redoes them.
When training ends, the chosen point's weights are put back before the model is saved.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from radsynth.configs import RadsynthConfig

from .scoring.frontier import FrontierPoint, FrontierScorer, choose, read_frontier, write_frontier

WEIGHTS_PATTERN = "step-{:07d}-{}.safetensors"


class Frontier:
    """The frontier of one diffusion run (``run_dir``), fed by its trainer's validation callback."""

    def __init__(self, config: RadsynthConfig, run_dir: Path, prompts: list[str], trainer) -> None:
        self.config, self.trainer = config, trainer
        self.folder = run_dir / "frontier"
        settings = config.diffusion
        # Evenly spread over the training prompts, the same at every point: the points differ by the weights only.
        picks = np.linspace(0, len(prompts) - 1, settings.frontier_samples).round().astype(int)
        self.prompts = [prompts[i] for i in picks]
        self.scorer: FrontierScorer | None = None  # built at the first point: the real side costs a minute once
        self.points = read_frontier(self.folder / "frontier.csv")

    def add(self, step: int, pipeline) -> dict[str, float]:
        """Score the pipeline's samples at ``step`` (inside the trainer's inference weights); returns the logs."""
        if self.scorer is None:
            # The first point of this run: what a killed run recorded from here on is redone.
            self.points = [p for p in self.points if p.step < step]
            for path in self.folder.glob("step-*.safetensors"):
                if int(path.name[5:12]) >= step:
                    path.unlink()
            self.scorer = FrontierScorer(self.config)
        generator = [torch.Generator().manual_seed(self.config.runtime.seed + i) for i in range(len(self.prompts))]
        pipeline.set_progress_bar_config(disable=True)
        sampling = self.config.sampling
        images = np.concatenate([
            pipeline(self.prompts[start:start + sampling.batch_size], num_inference_steps=sampling.num_inference_steps,
                     generator=generator[start:start + sampling.batch_size], output_type="np",
                     **sampling.guidance).images[:, 0]
            for start in range(0, len(self.prompts), sampling.batch_size)])
        point = self.scorer.score(step, images)
        best = choose(self.points)
        self.points = [p for p in self.points if p.step != step] + [point]
        if point.private and (best is None or choose([best, point]) is point):
            self.folder.mkdir(parents=True, exist_ok=True)
            for index, module in enumerate(self.trainer.unwrapped()):
                save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()},
                          str(self.folder / WEIGHTS_PATTERN.format(step, index)))
        write_frontier(self.points, self.folder)
        return {"frontier_coverage": point.coverage, "frontier_dcr_share": point.dcr_share,
                "frontier_copy_rate": point.copy_rate, "frontier_private": float(point.private)}

    def keep_chosen(self) -> FrontierPoint | None:
        """Put the chosen point's weights into the trained modules (inside the inference weights); None when no point
        was private, and the last weights stay."""
        chosen = choose(self.points)
        if chosen is not None and chosen.step != self.points[-1].step:
            for index, module in enumerate(self.trainer.unwrapped()):
                module.load_state_dict(load_file(str(self.folder / WEIGHTS_PATTERN.format(chosen.step, index))))
        return chosen

    def summary(self, chosen: FrontierPoint | None) -> dict:
        """What the model card says about the choice."""
        record = {"points": len(self.points), "last_step": self.points[-1].step if self.points else None,
                  "kept_step": chosen.step if chosen else None,
                  "kept": None if chosen is None else {k: round(v, 4) for k, v in vars(chosen).items() if k != "step"},
                  "private_points": sum(point.private for point in self.points)}
        (self.folder / "chosen.json").write_text(json.dumps(record, indent=2))
        return record

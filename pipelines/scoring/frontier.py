"""The privacy-realism frontier of a diffusion model in training, and the checkpoint chosen on it.

On small sets memorisation grows with training steps while realism rises and then flattens: the last checkpoint
is not necessarily the one to release. Every ``diffusion.frontier_every`` steps (and at the last) the model's
inference weights draw ``diffusion.frontier_samples`` images, scored as ``evaluate`` scores them and against the
same cached real side (``real_side``: the self-supervised encoder, the real features and the copy detector are
computed once and shared with evaluate): realism is the self-supervised coverage with its real floor at the same
n; memorisation is the DCR share against the holdout and the copy rate (pixel or embedding matches, the release
gate's rule), each with the gate's own limit (``privacy_decision``). The kept checkpoint is the most realistic
point that passes both. The white-box membership probe is left to evaluate: it needs the final model and many
samples. The copy detector here is calibrated without the generator's own near copies (it changes every point),
so it can flag fewer than evaluate's; the pixel matches do not depend on the generator.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

from radsynth.configs import RadsynthConfig

__all__ = ["FrontierPoint", "FrontierScorer", "choose", "read_frontier", "write_frontier"]


@dataclass(frozen=True)
class FrontierPoint:
    step: int
    coverage: float
    coverage_floor: float
    dcr_share: float
    dcr_share_limit: float
    copy_rate: float
    copy_rate_limit: float

    @property
    def private(self) -> bool:
        """Both sample-based privacy checks pass, at the release gate's limits."""
        return self.dcr_share <= self.dcr_share_limit and self.copy_rate <= self.copy_rate_limit


def choose(points: list[FrontierPoint]) -> FrontierPoint | None:
    """The most realistic private point (the later one on a tie); None when no point is private."""
    private = [point for point in points if point.private]
    return max(private, key=lambda point: (point.coverage, point.step)) if private else None


class FrontierScorer:
    """Scores freshly drawn samples against a build's real splits (train, holdout, test), as evaluate would."""

    def __init__(self, config: RadsynthConfig):
        from . import privacy
        from .evaluate import (
            FeatureTable,
            ScoringInputs,
            _copy_detector,
            _extractor,
            _real_side_cache,
            build_scoring_cache_dir,
            pixel_copy_reference,
        )
        from .loading import cached_split
        from .realism import median_bandwidth

        self.settings, self.seed, self.gate = config.scoring, config.runtime.seed, config.release.gate
        train, holdout, test = (cached_split(config, split) for split in ("train", "holdout", "test"))
        # No synthetic set yet and no pipeline: the entries shared with evaluate are those of the real side.
        real = ScoringInputs(None, train, holdout, test)
        self.cache = _real_side_cache(real, self.settings, self.seed, build_scoring_cache_dir(config))
        # Masks only when evaluate would use them too (every set has them), so the features entry is the same.
        with_masks = config.sampling.pairs and all(s.masks is not None for s in (train, holdout, test))
        extractor = _extractor("self_supervised", real, with_masks, self.settings, self.seed, self.cache)
        features = self.cache.arrays("features_self_supervised", lambda: {
            name: extractor.extract(s.images, s.masks if with_masks else None)
            for name, s in (("train", train), ("holdout", holdout), ("test", test))}, masks=with_masks)
        self.table = FeatureTable("self_supervised", extractor, np.empty((0, features["train"].shape[1])),
                                  features["train"], features["holdout"], features["test"])
        self.bandwidth = median_bandwidth(self.table.train, self.table.unseen, seed=self.seed)
        self.detector = privacy.CopyDetector(**self.cache.record("copy_detector", lambda: asdict(
            _copy_detector(real, self.table, self.settings, self.seed)), uses_model=False,
            space=self.table.name, sampler=None))
        self.train, self.train_groups, self.holdout_groups = train, train.groups, holdout.groups
        self.unseen_groups = real.unseen.groups
        # A copy is a pixel match or an embedding match, as the gate reads it; the holdout's rate is chance's.
        pixel_holdout, self.pixel_threshold = pixel_copy_reference(train, holdout, self.settings, self.cache)
        embedding_holdout = self.detector.flags(self.table.holdout, self.table.train,
                                                chunk=self.settings.nearest_neighbour_chunk)[0]
        self.holdout_copies = embedding_holdout | pixel_holdout.flags(self.pixel_threshold)

    def score(self, step: int, images: np.ndarray) -> FrontierPoint:
        """images: (N, *spatial) in [-1, 1], drawn by the model at ``step``."""
        from . import privacy
        from .evaluate import _set_metrics_with_floor, pixel_copies
        from .privacy_decision import PRIVACY_SPACE, _copy_rates, _dcr_share

        ids = [f"frontier-{i}" for i in range(len(images))]  # each sample its own bootstrap unit
        synthetic = self.table.extractor.extract(np.ascontiguousarray(images, dtype=np.float32))
        table = replace(self.table, synthetic=synthetic)
        realism = _set_metrics_with_floor(self.cache, table, synthetic, ids, self.train_groups, self.unseen_groups,
                                          self.bandwidth, self.settings, self.seed, metrics=["coverage"])
        dcr = privacy.dcr_share(synthetic, table.train, table.holdout, ids, self.train_groups, self.holdout_groups,
                                n_boot=self.settings.bootstrap_samples, seed=self.seed,
                                chunk=self.settings.nearest_neighbour_chunk)["share"]
        flags = (self.detector.flags(synthetic, table.train, chunk=self.settings.nearest_neighbour_chunk)[0]
                 | pixel_copies(images, self.train, self.settings, self.pixel_threshold))
        # The release gate's own checks, on the same rows it would read.
        rows = [{"section": "privacy", "metric": "dcr_share", "feature_space": PRIVACY_SPACE, "stratum": "all",
                 "value": dcr.value, "sd": dcr.sd},
                {"section": "privacy", "metric": "copy_rate", "feature_space": PRIVACY_SPACE, "stratum": "all",
                 "value": float(flags.mean()), "reference_value": float(self.holdout_copies.mean()), "n": len(images)}]
        dcr_check = _dcr_share(rows, self.gate)[0]
        copy_check = _copy_rates(rows, self.gate, {"holdout": len(self.holdout_copies)})[0]
        return FrontierPoint(step, realism["synthetic"]["coverage"].value, realism["real_floor"]["coverage"].value,
                             float(dcr.value), float(dcr_check.limit), float(flags.mean()), float(copy_check.limit))


FIELDS = [field.name for field in fields(FrontierPoint)]


def read_frontier(path: Path, up_to_step: int | None = None) -> list[FrontierPoint]:
    """The points of ``frontier.csv`` (those at or before ``up_to_step``: a resumed run redoes the later ones)."""
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        points = [FrontierPoint(int(row["step"]), *(float(row[name]) for name in FIELDS[1:]))
                  for row in csv.DictReader(handle)]
    return [point for point in points if up_to_step is None or point.step <= up_to_step]


def write_frontier(points: list[FrontierPoint], folder: Path) -> None:
    """``frontier.csv`` (one row per point, with whether it is private and which one was chosen) and
    ``frontier.png`` (realism against memorisation over steps, the chosen point marked)."""
    chosen = choose(points)
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / ".frontier.csv.tmp"
    with open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*FIELDS, "private", "chosen"])
        for point in points:
            writer.writerow([*(getattr(point, name) for name in FIELDS), point.private, point == chosen])
    temporary.replace(folder / "frontier.csv")
    _plot(points, chosen, folder / "frontier.png")


def _plot(points: list[FrontierPoint], chosen: FrontierPoint | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.5, 4.2))
    memorisation = [point.dcr_share for point in points]
    realism = [point.coverage for point in points]
    axis.plot(memorisation, realism, "-", color="0.7", zorder=1)
    scatter = axis.scatter(memorisation, realism, c=[point.step for point in points], cmap="viridis", zorder=2,
                           marker="o", edgecolors=["none" if point.private else "red" for point in points])
    figure.colorbar(scatter, ax=axis, label="training step")
    if points:
        axis.axvline(points[-1].dcr_share_limit, color="red", linestyle=":", label="DCR share limit (last point)")
        axis.axhline(points[-1].coverage_floor, color="0.4", linestyle="--", label="real floor (coverage)")
    if chosen is not None:
        axis.scatter([chosen.dcr_share], [chosen.coverage], s=220, facecolors="none", edgecolors="black",
                     linewidths=2, zorder=3, label=f"kept: step {chosen.step}")
    axis.set_xlabel("memorisation: DCR share (closer to train than to holdout)")
    axis.set_ylabel("realism: self-supervised coverage")
    axis.set_title("privacy-realism frontier (red edge: not private)")
    axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)

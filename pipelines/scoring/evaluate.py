"""Score synthetic images against the real data: realism, adherence, privacy and utility, in one scorecard.

``score`` takes the sets (synthetic, train, holdout, optional test) and, when the generator is at hand, its
pipeline for the white-box probes; ``evaluate`` builds those sets from a radsynth build. Every realism number
is read against its real-vs-real floor at the same sample size; every privacy number against what unseen
real images (the holdout) score on the same check.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from radsynth.configs import RadsynthConfig, UserInputError
from radsynth.configs.schema import GateConfig, ScoringConfig

from ..data.io import remove_temporaries
from . import fan_out
from .bootstrap import Estimate
from .fan_out import BatchMap, in_process
from .image_sets import ImageSet
from .privacy_decision import holdout_size_key, privacy_checks, privacy_verdict
from .real_side import RealSideCache
from .scorecard import Scorecard

CALIBRATION_SOURCES = 256


@dataclass
class SourceModality:
    """The train and holdout splits of a modality translated samples came from."""

    modality: str
    train: ImageSet
    holdout: ImageSet

    @property
    def stratum(self) -> str:
        return f"source modality={self.modality}"


@dataclass
class ScoringInputs:
    synthetic: ImageSet
    train: ImageSet
    holdout: ImageSet
    test: ImageSet | None = None
    pipeline: object | None = None  # a RadsynthTextToImagePipeline: enables round-trip copies and membership inference
    attributes: list[str] = field(default_factory=list)
    # How the samples were drawn ({num_inference_steps, guidance_scale}): the near copies the generator itself makes
    # for the copy detector's calibration are drawn so too. None: the pipeline's own defaults.
    sampler: dict | None = None
    # Translated samples with a paired rendering of each source case in the target modality (``scoring.paired_truth``):
    # the truth images, row for row with ``synthetic``, in the same [-1, 1] space.
    truth: np.ndarray | None = None
    # Translated samples: the real cases of each modality they were translated from, which privacy is read against
    # too (scoring one modality leaves the source modality's patients out of train and holdout).
    sources: list[SourceModality] = field(default_factory=list)

    @property
    def unseen(self) -> ImageSet:
        """Real images the generator never saw (holdout + test): the realism floor's stand-in for synthetic."""
        if self.test is None:
            return self.holdout
        return _concatenate(self.holdout, self.test, "unseen")

    @property
    def evaluation(self) -> ImageSet:
        """Where a model trained on real data is scored: the test split, else the holdout."""
        return self.test if self.test is not None else self.holdout


@dataclass
class ScoreResult:
    scorecard: Scorecard
    paths: dict[str, Path]
    seconds: dict[str, float]


def score(inputs: ScoringInputs, settings: ScoringConfig, out_dir: str | Path, seed: int = 0,
          log=print, gate: GateConfig | None = None, cache_dir: str | Path | None = None,
          map_batches: BatchMap = in_process) -> ScoreResult:
    """The scorecard of ``inputs``; its privacy verdict is the release gate's privacy decision under ``gate``
    (``release.gate``; its defaults for an audit without a config).

    cache_dir: where real-side work is kept between runs (``real_side``); None computes it in this run only.
    map_batches: where the synthetic side's per-sample work runs (``fan_out``). The scorecard is the same either way.
    """
    _check_compatible(inputs)
    cache = _real_side_cache(inputs, settings, seed, cache_dir)
    card = Scorecard(sizes={"synthetic": len(inputs.synthetic), "train": len(inputs.train),
                            "holdout": len(inputs.holdout), "test": len(inputs.test) if inputs.test else 0,
                            "holdout_patients": len(set(inputs.holdout.groups))})
    card.settings = settings.model_dump(mode="json")
    card.notes.append("Realism intervals are patient-level half-samples without replacement, centred on the value "
                      "(a with-replacement bootstrap inflates FD, KID and density, so its interval can miss its own "
                      "value); adherence, privacy and utility intervals are patient-level bootstraps.")
    card.per_sample = [{"sample_id": i, "is_synthetic": True, "prompt": p, **{f"cond_{k}": v for k, v in c.items()}}
                       for i, p, c in zip(inputs.synthetic.ids, inputs.synthetic.prompts, inputs.synthetic.conditions)]
    # Every score names the bytes it scored: the release recomputes these before it publishes a sample.
    for row, source in zip(card.per_sample, inputs.synthetic.sources):
        row.update(source)
    card.bind(inputs.synthetic.sources, settings)
    seconds: dict[str, float] = {}

    def timed(name, step):
        started = time.perf_counter()
        log(f"scoring: {name}")
        with tqdm(desc=f"scoring {name}", unit="step", disable=None) as bar:
            result = step(bar.update)
        seconds[name] = round(time.perf_counter() - started, 2)
        return result

    features = timed("features", lambda tick: _features(inputs, settings, seed, cache, map_batches, tick))
    timed("realism", lambda tick: _realism(card, inputs, features, settings, seed, cache, tick))
    timed("adherence", lambda tick: _adherence(card, inputs, settings, seed, cache, tick))
    timed("privacy", lambda tick: _privacy(card, inputs, features, settings, seed, cache, map_batches, tick))
    if settings.utility:
        timed("utility", lambda tick: _utility(card, inputs, settings, seed, cache, tick))
    if inputs.truth is not None:
        timed("translation", lambda tick: _translation(card, inputs, settings, seed, tick))
    log(f"scoring: real-side work {cache.hits} entries reused, {cache.misses} computed"
        + (f" (kept in {cache.folder})" if cache.folder is not None else ""))
    remove_temporaries(out_dir)  # a scoring run killed mid-write left them; this run rewrites every file
    for row in card.per_sample:
        row["flagged"] = any(value is True for key, value in row.items() if key.endswith(("pixel_copy", "embedding_copy")))
    card.verdicts["privacy"] = privacy_verdict(privacy_checks(card.to_dict(), gate or GateConfig()))
    card.settings["seconds"] = seconds
    paths = card.write(out_dir)
    return ScoreResult(card, paths, seconds)


def _real_side_cache(inputs: ScoringInputs, settings: ScoringConfig, seed: int,
                     cache_dir: str | Path | None) -> RealSideCache:
    model = None
    if inputs.pipeline is not None:  # the white-box probes' entries are the generator's too
        from ..sampling.pipeline import model_hash

        model = model_hash(inputs.pipeline) if cache_dir is not None else "this run's generator"
    return RealSideCache(cache_dir, [inputs.train, inputs.holdout, inputs.test], settings.model_dump(mode="json"),
                         seed, model=model)


# ------------------------------------------------------------------------------------------ features


@dataclass
class FeatureTable:
    """Features of every set in one space, plus the extractor (its ``extract`` embeds new images)."""

    name: str
    extractor: object
    synthetic: np.ndarray
    train: np.ndarray
    holdout: np.ndarray
    test: np.ndarray | None
    uses_masks: bool = False
    mean: np.ndarray | float = 0.0  # the standardisation applied to every set (see _standardise)
    sd: np.ndarray | float = 1.0

    def embed(self, images: np.ndarray, masks: np.ndarray | None) -> np.ndarray:
        """Features of new images (near copies), mapped exactly like the sets' features."""
        return (self.extractor.extract(images, masks if self.uses_masks else None) - self.mean) / self.sd

    @property
    def unseen(self) -> np.ndarray:
        return self.holdout if self.test is None else np.concatenate([self.holdout, self.test])


def _features(inputs: ScoringInputs, settings: ScoringConfig, seed: int, cache: RealSideCache,
              map_batches: BatchMap, tick) -> list[FeatureTable]:
    real = {"train": inputs.train, "holdout": inputs.holdout, "test": inputs.test}
    with_masks = all(s.masks is not None for s in [inputs.synthetic, *real.values()] if s is not None)
    tables = []
    for name in settings.feature_spaces:
        extractor = _extractor(name, inputs, with_masks, settings, seed, cache)

        def extract(image_set: ImageSet, extractor=extractor) -> np.ndarray:
            return extractor.extract(image_set.images, image_set.masks if with_masks else None)

        features = cache.arrays(f"features_{name}", lambda: {k: extract(s) for k, s in real.items() if s is not None},
                                masks=with_masks)
        synthetic = fan_out.embed(extractor, inputs.synthetic, with_masks, map_batches, settings.batch_size)
        table = FeatureTable(name, extractor, synthetic, features["train"], features["holdout"],
                             features.get("test"), uses_masks=with_masks)
        tables.append(table if name == "self_supervised" else _standardise(table))
        tick()
    return tables


def _extractor(name: str, inputs: ScoringInputs, with_masks: bool, settings: ScoringConfig, seed: int,
               cache: RealSideCache):
    from .features import RadiomicsFeatures, RandomCNNFeatures, SelfSupervisedEncoder

    dims = inputs.train.spatial_dims
    if name == "random_cnn":
        return RandomCNNFeatures(dims, seed=seed)
    if name == "radiomics":
        # Per-label radiomics only when every set has label maps (synthetic ones: their conditioning masks).
        labels = sorted(set(np.unique(inputs.train.masks).tolist()) - {0}) if with_masks else None
        return RadiomicsFeatures(dims, labels=labels)
    # Trained on train + holdout together, so neither the members nor the non-members are favoured.
    extractor = SelfSupervisedEncoder(dims, seed=seed)
    cache.weights("self_supervised_encoder", {"encoder": extractor.encoder, "head": extractor.head},
                  lambda: extractor.fit(np.concatenate([inputs.train.images, inputs.holdout.images]),
                                        steps=settings.self_supervised_steps))
    return extractor


def real_scaling(real: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, SD) per feature of real rows, the map every set is z-scored with; a feature constant on the real
    images keeps its units (SD 1)."""
    mean, sd = real.mean(0), real.std(0)
    sd[sd == 0] = 1.0
    return mean, sd


def _standardise(table: FeatureTable) -> FeatureTable:
    """z-score every feature with the real images' mean and SD (one linear map for all sets).

    Radiomics features come in unrelated units (a kurtosis, an energy, a grey-level count): unscaled, the
    largest would decide every nearest neighbour. The self-supervised space is a unit-norm embedding and is
    left as trained.
    """
    mean, sd = real_scaling(np.concatenate([a for a in (table.train, table.holdout, table.test) if a is not None]))
    scaled = [None if a is None else (a - mean) / sd for a in (table.synthetic, table.train, table.holdout, table.test)]
    return FeatureTable(table.name, table.extractor, *scaled, uses_masks=table.uses_masks, mean=mean, sd=sd)


def _diagnostic_features(inputs: ScoringInputs, cache: RealSideCache) -> FeatureTable | None:
    """The generator's own latents: realism there is a diagnostic, never a verdict (see GeneratorLatentFeatures)."""
    if inputs.pipeline is None:
        return None
    from .generator_probes import GeneratorLatentFeatures

    extractor = GeneratorLatentFeatures(inputs.pipeline)
    real = {"train": inputs.train, "holdout": inputs.holdout, "test": inputs.test}
    features = cache.arrays("features_generator_latents", uses_model=True, compute=lambda: {
        k: extractor.extract(s.images) for k, s in real.items() if s is not None})
    return FeatureTable(extractor.name, extractor, extractor.extract(inputs.synthetic.images), features["train"],
                        features["holdout"], features.get("test"))


def _primary(features: list[FeatureTable]) -> FeatureTable:
    """The space privacy is judged in: the self-supervised one when present (it is trained to see copies)."""
    return next((t for t in features if t.name == "self_supervised"), features[0])


# ------------------------------------------------------------------------------------------- realism


def _known_floor(cache: RealSideCache, metric, table: FeatureTable, train_groups, unseen_groups, n_boot: int,
                 seed: int, reference=None, **key):
    """``with_real_floor``'s floor at n through the cache: it reads the real features only."""
    from . import realism

    def floor(n: int):
        estimates = cache.record("realism_floor", lambda: {
            name: e.to_dict() for name, e in realism.real_floor(metric, table.train, table.unseen, train_groups,
                                                                 unseen_groups, n, n_boot, seed, reference).items()},
            uses_model=table.name == "generator_latents", space=table.name, n=n, **key)
        return {name: Estimate.from_dict(values) for name, values in estimates.items()}

    return floor


# k of precision/recall and of density/coverage (set_metrics' defaults), for the training halves' geometry
_NEIGHBOURS = (3, 5)


def _set_metrics_with_floor(cache: RealSideCache, table: FeatureTable, synthetic: np.ndarray, synthetic_groups,
                            train_groups, unseen_groups, bandwidth: float, settings: ScoringConfig, seed: int,
                            metrics: list[str] | None = None, **key) -> dict:
    """``set_metrics`` of the synthetic features and of the real floor against the training features, with their
    half-sample intervals. The real side goes through the cache: the geometry of every replicate's training half
    (``realism.RealGeometry``, shared by both sides) and the floor; a fresh synthetic set pays for its own side."""
    from . import realism

    n_boot = settings.bootstrap_samples
    rows = realism.training_rows(train_groups, n_boot, seed)
    packed = cache.arrays("realism_geometry", lambda: realism.pack([
        realism.RealGeometry.of(table.train, _NEIGHBOURS, bandwidth, r) for r in rows]),
        uses_model=table.name == "generator_latents", space=table.name, **key)
    known = dict(zip((r.tobytes() for r in rows), realism.unpack(packed, table.train, rows, bandwidth)))

    def reference(train_rows: np.ndarray):
        found = known.get(np.asarray(train_rows).tobytes())
        return found if found is not None else realism.RealGeometry.of(table.train, _NEIGHBOURS, bandwidth, train_rows)

    def metric(a, b):
        # KID over a few subsets: the half-samples already resample, more subsets only add cost.
        return realism.set_metrics(a, b, bandwidth, *_NEIGHBOURS, kid_subsets=5, seed=seed,
                                   only=metrics or realism.SET_METRICS)

    floor = _known_floor(cache, metric, table, train_groups, unseen_groups, n_boot, seed, reference,
                         metrics=metrics, **key)
    return realism.with_real_floor(metric, synthetic, table.train, table.unseen, synthetic_groups, train_groups,
                                   unseen_groups, n_boot=n_boot, seed=seed, known_floor=floor, reference=reference)


def _realism(card: Scorecard, inputs: ScoringInputs, features: list[FeatureTable], settings: ScoringConfig,
             seed: int, cache: RealSideCache, tick) -> None:
    from . import realism
    from .diversity import ms_ssim_diversity_comparison

    better = {"frechet_distance": "lower", "fd_infinity": "lower", "kid": "lower", "rbf_mmd": "lower",
              "precision": "near reference", "recall": "near reference", "density": "near reference",
              "coverage": "near reference"}
    unseen = inputs.unseen
    diagnostic = _diagnostic_features(inputs, cache)
    bandwidths = {}
    for table in features + ([diagnostic] if diagnostic is not None else []):
        # One bandwidth for the synthetic value and its floor, or the two would be on different kernels.
        bandwidth = bandwidths[table.name] = realism.median_bandwidth(table.train, table.unseen, seed=seed)
        result = _set_metrics_with_floor(cache, table, table.synthetic, inputs.synthetic.groups, inputs.train.groups,
                                         unseen.groups, bandwidth, settings, seed)
        # FD-infinity refits FD at 15 subset sizes: inside the bootstrap it cost two thirds of all realism time
        # (1000 x 1000 images, 480 features), so it is a point value on the same n-subsets, without interval.
        def fd_infinity(a, b):
            return {"fd_infinity": realism.fd_infinity(a, b, seed=seed)}

        found = realism.with_real_floor(
            fd_infinity, table.synthetic, table.train, table.unseen, inputs.synthetic.groups, inputs.train.groups,
            unseen.groups, n_boot=0, seed=seed, known_floor=_known_floor(
                cache, fd_infinity, table, inputs.train.groups, unseen.groups, 0, seed, metrics=["fd_infinity"]))
        for side in ("synthetic", "real_floor"):
            result[side]["fd_infinity"] = found[side]["fd_infinity"]
        for metric, direction in better.items():
            card.add("realism", metric, result["synthetic"][metric], feature_space=table.name,
                     reference=result["real_floor"][metric], reference_name="real vs real", n=result["n"],
                     better=direction, note="diagnostic only: the generator's own space" if table is diagnostic else "")
        tick()
    _realism_strata(card, inputs, features[0], bandwidths[features[0].name], settings, seed, cache, tick)
    diversity = ms_ssim_diversity_comparison(inputs.synthetic.images, unseen.images, inputs.synthetic.groups,
                                             unseen.groups, n_boot=settings.bootstrap_samples, seed=seed)
    card.add("realism", "ms_ssim_between_samples", diversity["synthetic"], feature_space="pixels",
             reference=diversity["real"], reference_name="unseen real pairs", n=diversity["n"],
             better="near reference (lower = more diverse)")
    _intensity(card, inputs, settings, seed)


def _strata(inputs: ScoringInputs, settings: ScoringConfig) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, synthetic mask, unseen-real mask) per attribute value with enough images on both sides."""
    strata = []
    unseen = inputs.unseen
    for key in inputs.attributes:
        values = sorted({c.get(key) for c in inputs.synthetic.conditions} - {None})
        for value in values:
            synthetic = np.array([c.get(key) == value for c in inputs.synthetic.conditions])
            real = np.array([c.get(key) == value for c in unseen.conditions])
            strata.append((f"{key}={value}", synthetic, real))
    return [(name, s, r) for name, s, r in strata if s.sum() >= 2]


def _realism_strata(card: Scorecard, inputs: ScoringInputs, table: FeatureTable, bandwidth: float,
                    settings: ScoringConfig, seed: int, cache: RealSideCache, tick) -> None:
    unseen = inputs.unseen
    for name, synthetic, real in _strata(inputs, settings):
        train = np.array([c.get(name.split("=")[0]) == name.split("=", 1)[1] for c in inputs.train.conditions])
        if min(synthetic.sum(), real.sum(), train.sum()) < settings.min_stratum_size:
            card.notes.append(f"stratum {name}: {synthetic.sum()} synthetic, {real.sum()} unseen real, "
                              f"{train.sum()} train images: below min_stratum_size {settings.min_stratum_size}, "
                              "not scored")
            continue
        groups = [np.asarray(g)[m].tolist() for g, m in ((inputs.synthetic.groups, synthetic),
                                                           (inputs.train.groups, train), (unseen.groups, real))]
        stratum = replace(table, train=table.train[train], holdout=table.unseen[real], test=None)
        result = _set_metrics_with_floor(cache, stratum, table.synthetic[synthetic], *groups, bandwidth, settings,
                                         seed, metrics=["frechet_distance", "coverage"], stratum=name)
        tick()
        for metric in ("frechet_distance", "coverage"):
            card.add("realism", metric, result["synthetic"][metric], feature_space=table.name, stratum=name,
                     reference=result["real_floor"][metric], reference_name="real vs real", n=result["n"])


def _intensity(card: Scorecard, inputs: ScoringInputs, settings: ScoringConfig, seed: int) -> None:
    from .adherence import intensity_plausibility

    report = intensity_plausibility(inputs.synthetic, inputs.train, labels=_labels(inputs),
                                    n_boot=settings.bootstrap_samples, seed=seed)
    for label, row in report["per_label"].items():
        card.add("realism", "intensity_median_in_real_range", row["share_inside"], feature_space="physical units",
                 stratum=f"label {label}", reference=row["real_share_inside"], reference_name="real train",
                 n=len(inputs.synthetic), better="higher", note=f"real range {row['real_range']}")
    for record, flags in zip(card.per_sample, report["per_sample_outside"]):
        record["intensity_outside_real_range"] = bool(flags)
    card.verdicts["intensity"] = {"passed": bool(report["passed"]), "reasons": report.get("reasons", [])}


# ----------------------------------------------------------------------------------------- adherence


def _labels(inputs: ScoringInputs) -> list[int] | None:
    """Label values to score per label: those of the training masks, when synthetic and real sets have masks."""
    sets = (inputs.synthetic, inputs.train, inputs.evaluation)
    if any(s.masks is None for s in sets):
        return None
    return sorted(set(np.unique(inputs.train.masks).tolist()) - {0}) or None


def _adherence(card: Scorecard, inputs: ScoringInputs, settings: ScoringConfig, seed: int, cache: RealSideCache,
               tick) -> None:
    from .adherence import dice_ratio_from_scores, segment, volume_agreement

    evaluation, labels = inputs.evaluation, _labels(inputs)
    if labels is not None:
        segmenter = _real_segmenter(inputs, labels, settings, seed, cache)
        synthetic, real = (segment(segmenter, s, labels, inputs.train.spacing) for s in (inputs.synthetic, evaluation))
        report = dice_ratio_from_scores(synthetic.dice, real.dice, inputs.synthetic.groups, evaluation.groups, labels,
                                        inputs.synthetic.ids, n_boot=settings.bootstrap_samples, seed=seed)
        for name, row in report["per_label"].items():
            card.add("adherence", "mask_dice_ratio", row["ratio"], feature_space="segmenter (real train)",
                     stratum=f"label {name}", reference=row["real_dice"], reference_name="segmenter Dice on real test",
                     n=row["n_synthetic"], better="near 1", note=f"synthetic Dice {row['synthetic_dice'].value:.3f}")
        for record, sample in zip(card.per_sample, report["per_sample"]):
            record.update({k: v for k, v in sample.items() if k != "id"})
        volumes = volume_agreement(synthetic.predicted_volumes, synthetic.mask_volumes, labels,
                                   inputs.train.spatial_dims, real.predicted_volumes, real.mask_volumes)
        for name, row in volumes["per_label"].items():
            reference = volumes["reference"][name] if volumes["reference"] else {}
            card.add("adherence", "label_volume_median_abs_relative_error", row["median_absolute_relative_error"],
                     feature_space="segmenter (real train)", stratum=f"label {name}",
                     reference=reference.get("median_absolute_relative_error"), reference_name="real test",
                     n=row["n"], better="near reference", note=f"volumes in {volumes['unit']}")
        tick()
    else:
        card.notes.append("mask-Dice ratio: not applicable (the synthetic samples or the real data have no masks)")

    for attribute in _scorable_attributes(inputs):
        from .adherence import attribute_adherence

        report = attribute_adherence(_real_classifier(inputs, attribute, settings, seed, cache), inputs.synthetic,
                                     evaluation, attribute, n_boot=settings.bootstrap_samples, seed=seed)
        card.add("adherence", "attribute_balanced_accuracy_ratio", report["ratio"],
                 feature_space="classifier (real train)", stratum=attribute,
                 reference=report["real_balanced_accuracy"], reference_name="classifier on real test",
                 n=report["n"], better="near 1", note=f"ratio at chance {report['chance_ratio']:.3g}")
        for value, row in report["per_value"].items():
            card.add("adherence", "attribute_accuracy", row["accuracy"], feature_space="classifier (real train)",
                     stratum=f"{attribute}={value}", reference=report["chance"], reference_name="chance",
                     n=row["n"], better="higher")
        by_id = {row["id"]: row for row in report["per_sample"]}
        for record in card.per_sample:
            record.update({k: v for k, v in by_id.get(record["sample_id"], {}).items() if k != "id"})
        tick()


def _translation(card: Scorecard, inputs: ScoringInputs, settings: ScoringConfig, seed: int, tick) -> None:
    from .translation import pixel_truth

    truth = pixel_truth(inputs.synthetic.images, inputs.truth, inputs.synthetic.groups, settings.bootstrap_samples, seed)
    for metric, better in (("ssim", "higher"), ("psnr", "higher")):
        card.add("translation", f"pixel_truth_{metric}", truth[metric], feature_space="paired rendering",
                 n=len(inputs.truth), better=better, note="against the same case in the target modality")
    for record, ssim, psnr in zip(card.per_sample, truth["ssim_per_image"], truth["psnr_per_image"]):
        record.update({"truth_ssim": float(ssim), "truth_psnr": float(psnr)})
    tick()


def _scorable_attributes(inputs: ScoringInputs) -> list[str]:
    """Attributes with two or more values in the training data that the synthetic samples were prompted with."""
    return [a for a in inputs.attributes
            if len({c.get(a) for c in inputs.train.conditions} - {None}) >= 2
            and any(c.get(a) for c in inputs.synthetic.conditions)]


def _real_segmenter(inputs: ScoringInputs, labels: list[int], settings: ScoringConfig, seed: int,
                    cache: RealSideCache):
    from .segmenter import Segmenter

    segmenter = Segmenter(inputs.train.spatial_dims, num_classes=max(labels) + 1, seed=seed)
    cache.weights("adherence_segmenter", {"network": segmenter.network}, labels=labels,
                  fit=lambda: segmenter.fit(inputs.train.images, inputs.train.masks, steps=settings.segmenter_steps))
    return segmenter


def _real_classifier(inputs: ScoringInputs, attribute: str, settings: ScoringConfig, seed: int,
                     cache: RealSideCache):
    from .attribute_classifier import AttributeClassifier

    classes = sorted({c.get(attribute) for c in inputs.train.conditions} - {None})
    known = [i for i, c in enumerate(inputs.train.conditions) if c.get(attribute) in classes]
    classifier = AttributeClassifier(inputs.train.images.shape[1:], classes, seed=seed)
    cache.weights("adherence_classifier", {"network": classifier.network}, attribute=attribute, classes=classes,
                  fit=lambda: classifier.fit(torch.from_numpy(inputs.train.images[known])[:, None],
                                             [inputs.train.conditions[i][attribute] for i in known],
                                             steps=settings.classifier_steps))
    return classifier


# ------------------------------------------------------------------------------------------- privacy


def _privacy(card: Scorecard, inputs: ScoringInputs, features: list[FeatureTable], settings: ScoringConfig,
             seed: int, cache: RealSideCache, map_batches: BatchMap, tick) -> None:
    from . import privacy

    synthetic, train, holdout = inputs.synthetic, inputs.train, inputs.holdout
    pixel_holdout, pixel_threshold = pixel_copy_reference(train, holdout, settings, cache)
    pixel = fan_out.pixel_matches(synthetic, train.images, _pixel_settings(settings), map_batches, settings.batch_size)
    tick()
    pixel_copy = pixel.flags(pixel_threshold)
    card.add("privacy", "pixel_copy_rate", float(pixel_copy.mean()), feature_space="pixels",
             reference=float(pixel_holdout.flags(pixel_threshold).mean()), reference_name="holdout",
             n=len(synthetic), better="near reference", note=f"correlation threshold {pixel_threshold:.4f}")
    card.add("privacy", "pixel_nn_correlation_median", float(np.median(pixel.correlation)), feature_space="pixels",
             reference=float(np.median(pixel_holdout.correlation)), reference_name="holdout", n=len(synthetic),
             better="near reference")

    table = _primary(features)
    detector = privacy.CopyDetector(**cache.record("copy_detector", lambda: asdict(
        _copy_detector(inputs, table, settings, seed)), uses_model=inputs.pipeline is not None, space=table.name,
        sampler=inputs.sampler))
    tick()
    flags, similarity, nn_index = detector.flags(table.synthetic, table.train)
    holdout_flags, _, _ = detector.flags(table.holdout, table.train)
    card.add("privacy", "embedding_copy_rate", float(flags.mean()), feature_space=table.name,
             reference=float(holdout_flags.mean()), reference_name="holdout", n=len(synthetic), better="near reference",
             note=f"similarity threshold {detector.threshold:.4f}: recall {detector.achieved_recall:.0%} on near "
                  f"copies (target {detector.recall:.0%}), {detector.holdout_false_positive_rate:.0%} of holdout")
    # The gate reads either check: a copy one of them misses (a flipped image in F2, a regenerated one in pixels)
    # is still a copy. The holdout's rate under the same rule is what chance alone gives.
    copy_rate = float((flags | pixel_copy).mean())
    holdout_copy_rate = float((holdout_flags | pixel_holdout.flags(pixel_threshold)).mean())
    card.add("privacy", "copy_rate", copy_rate, feature_space=f"pixels or {table.name}", reference=holdout_copy_rate,
             reference_name="holdout", n=len(synthetic), better="near reference")

    dcr = {}
    for t in features:
        dcr[t.name] = privacy.dcr_share(t.synthetic, t.train, t.holdout, synthetic.groups, train.groups,
                                        holdout.groups, n_boot=settings.bootstrap_samples, seed=seed,
                                        chunk=settings.nearest_neighbour_chunk)
        card.add("privacy", "dcr_share", dcr[t.name]["share"], feature_space=t.name, reference=0.5,
                 reference_name="private generator", n=len(synthetic), better="near 0.5",
                 note="P(closer to train than to holdout); the two matched in patients, then rows")
    authenticity = privacy.authenticity_report(table.synthetic, table.train, table.holdout)
    card.add("privacy", "authentic_share", authenticity["synthetic"], feature_space=table.name,
             reference=authenticity["holdout_baseline"], reference_name="holdout", n=len(synthetic),
             better="near reference")

    primary_dcr = dcr[table.name]
    card.add("privacy", "min_dcr", float(primary_dcr["min_dcr"]), feature_space=table.name, n=len(synthetic),
             reference=authenticity["holdout_min_distance"], reference_name="holdout's closest distance to train",
             better="above 0", note="0, or far below the closest unseen real image, means an exact copy")
    for i, record in enumerate(card.per_sample):
        record.update(pixel_nn_id=train.ids[pixel.train_index[i]], pixel_nn_correlation=float(pixel.correlation[i]),
                      pixel_nn_l2=float(pixel.normalised_l2[i]), pixel_copy=bool(pixel_copy[i]),
                      embedding_nn_id=train.ids[int(nn_index[i])], embedding_similarity=float(similarity[i]),
                      embedding_copy=bool(flags[i]), dcr_train=float(primary_dcr["dcr_train"][i]),
                      dcr_holdout=float(primary_dcr["dcr_holdout"][i]),
                      authentic=bool(authenticity["per_sample"][i]))
    _privacy_strata(card, inputs, flags | pixel_copy, primary_dcr)
    for source in inputs.sources:
        _source_privacy(card, inputs, source, table, settings, seed, cache, map_batches)
    tick()
    _membership(card, inputs, settings, seed, cache)
    tick()


def _source_privacy(card: Scorecard, inputs: ScoringInputs, source: SourceModality, table: FeatureTable,
                    settings: ScoringConfig, seed: int, cache: RealSideCache, map_batches: BatchMap) -> None:
    """A translation must not be a source-modality training patient either (a CT case carried into MRI is still
    that patient): pixel copies of the source's training images (correlation is blind to the change of contrast
    when the anatomy is kept) and the DCR share against the source's train and holdout, both gated."""
    from . import privacy
    from .real_side import set_fingerprint

    synthetic, fingerprint = inputs.synthetic, [set_fingerprint(source.train), set_fingerprint(source.holdout)]
    pixel_holdout, threshold = pixel_copy_reference(source.train, source.holdout, settings, cache, source=fingerprint)
    pixel = fan_out.pixel_matches(synthetic, source.train.images, _pixel_settings(settings), map_batches,
                                  settings.batch_size)
    copies = pixel.flags(threshold)
    card.add("privacy", "copy_rate", float(copies.mean()), feature_space="pixels", stratum=source.stratum,
             reference=float(pixel_holdout.flags(threshold).mean()), reference_name="source holdout",
             n=len(synthetic), better="near reference",
             note=f"against the {source.modality} training images; correlation threshold {threshold:.4f}")
    real = cache.arrays(f"features_source_{table.name}", lambda: {
        split: table.embed(image_set.images, image_set.masks)
        for split, image_set in (("train", source.train), ("holdout", source.holdout))}, source=fingerprint)
    dcr = privacy.dcr_share(table.synthetic, real["train"], real["holdout"], synthetic.groups, source.train.groups,
                            source.holdout.groups, n_boot=settings.bootstrap_samples, seed=seed,
                            chunk=settings.nearest_neighbour_chunk)
    card.add("privacy", "dcr_share", dcr["share"], feature_space=table.name, stratum=source.stratum, reference=0.5,
             reference_name="private generator", n=len(synthetic), better="near 0.5",
             note=f"against the {source.modality} train and holdout, matched in patients, then rows")
    card.sizes[holdout_size_key(source.stratum)] = len(source.holdout)
    for i, record in enumerate(card.per_sample):
        record.update({f"source_{source.modality}_pixel_nn_id": source.train.ids[pixel.train_index[i]],
                       f"source_{source.modality}_pixel_copy": bool(copies[i])})


def _pixel_settings(settings: ScoringConfig) -> dict:
    return {"max_shift": settings.pixel_max_shift, "comparison_size": settings.pixel_comparison_size,
            "chunk": settings.nearest_neighbour_chunk}


def pixel_copy_reference(train: ImageSet, holdout: ImageSet, settings: ScoringConfig, cache: RealSideCache,
                         **parts):
    """The holdout's pixel matches against train (cached) and the correlation threshold they calibrate: at most 1%
    of unseen real images are flagged by chance. Returns (holdout matches, threshold). parts: what tells the cache
    entry apart when train and holdout are not the cache's own real sets."""
    from . import privacy

    stored = cache.arrays("pixel_matches_holdout", lambda: asdict(
        privacy.pixel_nearest_neighbours(holdout.images, train.images, **_pixel_settings(settings))), **parts)
    matches = privacy.PixelMatches(**{**stored, "comparison_shape": tuple(stored["comparison_shape"].tolist())})
    return matches, privacy.threshold_at_false_positive_rate(matches.correlation, 0.01)


def pixel_copies(images: np.ndarray, train: ImageSet, settings: ScoringConfig, threshold: float) -> np.ndarray:
    """Which images match a training image in pixels (shifted, correlated) above ``threshold``."""
    from . import privacy

    return privacy.pixel_nearest_neighbours(images, train.images, **_pixel_settings(settings)).flags(threshold)


def _copy_detector(inputs: ScoringInputs, table: FeatureTable, settings: ScoringConfig, seed: int):
    """Calibrate the embedding-space copy threshold on near copies of training images we make ourselves."""
    from . import privacy
    from .features.augment import augment
    from .near_copies import near_copies

    # Copies of at most CALIBRATION_SOURCES training images: enough for a 95% quantile, bounded cost.
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(inputs.train), min(len(inputs.train), CALIBRATION_SOURCES), replace=False))
    sources = inputs.train.subset(rows)
    images = torch.from_numpy(sources.images)[:, None]
    copies = {"augmented": augment(images, torch.Generator().manual_seed(seed), strength=0.5)[:, 0].numpy()}
    for kind in ("noise", "flip_shift", "gamma"):
        copies[kind] = near_copies(sources.images, kind, seed=seed)
    if inputs.pipeline is not None:
        from .generator_probes import autoencoder_round_trip, partial_noise_regeneration

        copies["autoencoder_round_trip"] = autoencoder_round_trip(inputs.pipeline, images)[:, 0].numpy()
        # What a memorising generator emits: a training latent partly noised and denoised again.
        copies["partial_noise_regeneration"] = partial_noise_regeneration(
            inputs.pipeline, images, sources.prompts, strength=0.3, seed=seed, spacing=sources.spacing,
            conditions=sources.conditions, label_maps=sources.masks, **(inputs.sampler or {}))[:, 0].numpy()
    # A near copy keeps its source's label map (close enough for the small shifts of the copies made here).
    embeddings = {kind: table.embed(copy, sources.masks) for kind, copy in copies.items()}
    kinds = [kind for kind, e in embeddings.items() for _ in range(len(e))]
    copy_embeddings = np.concatenate(list(embeddings.values()))
    # Every kind of copy is held to the recall target, not only their mix.
    detector = privacy.CopyDetector.calibrate(np.concatenate([table.train[rows]] * len(copies)), copy_embeddings,
                                              settings.copy_detection_recall, train_embeddings=table.train,
                                              copy_kinds=kinds, chunk=settings.nearest_neighbour_chunk)
    return detector.with_false_positive_ceiling(copy_embeddings, table.holdout, table.train,
                                                chunk=settings.nearest_neighbour_chunk)


def _privacy_strata(card: Scorecard, inputs: ScoringInputs, copies: np.ndarray, dcr: dict) -> None:
    # On the size-matched references, as the overall share: the whole (larger) training set would put most
    # samples of a private generator "closer to train" by chance.
    closer_to_train = dcr["closer_to_train"]
    for key in inputs.attributes:
        for value in sorted({c.get(key) for c in inputs.synthetic.conditions} - {None}):
            rows = np.array([c.get(key) == value for c in inputs.synthetic.conditions])
            card.add("privacy", "copy_rate (pixel or embedding)", float(copies[rows].mean()), stratum=f"{key}={value}",
                     n=int(rows.sum()), better="lower")
            card.add("privacy", "closer_to_train_share", float(closer_to_train[rows].mean()), stratum=f"{key}={value}",
                     reference=0.5, reference_name="private generator", n=int(rows.sum()), better="near 0.5",
                     note="no bootstrap: strata are small")


def _membership(card: Scorecard, inputs: ScoringInputs, settings: ScoringConfig, seed: int,
                cache: RealSideCache) -> dict | None:
    if inputs.pipeline is None or not settings.membership_inference:
        card.notes.append("membership inference: not run (no generator given, or scoring.membership_inference off)")
        return None
    from .generator_probes import membership_inference_report

    by = inputs.attributes[0] if inputs.attributes else None
    # Members and non-members are real images: the whole report is real-side work of this generator.
    report = cache.record("membership_inference", lambda: membership_inference_report(
        inputs.pipeline, inputs.train, inputs.holdout, n_max=settings.membership_samples,
        timesteps=settings.membership_timesteps, seed=seed, n_boot=settings.bootstrap_samples, by=by),
        uses_model=True, by=by)
    card.add("privacy", "membership_inference_auc", Estimate(**report["auc_ci"]), feature_space="denoising loss",
             reference=0.5, reference_name="no membership signal", n=report["n_members"], better="near 0.5")
    card.add("privacy", "membership_inference_tpr_at_1pct_fpr", report["tpr_at_1pct_fpr"],
             feature_space="denoising loss", reference=0.01, reference_name="chance", n=report["n_members"],
             better="near reference", note=report.get("fpr_resolution") or "")
    for value, row in report.get("by_condition", {}).items():
        card.add("privacy", "membership_inference_auc", row["auc"], feature_space="denoising loss",
                 stratum=f"{inputs.attributes[0]}={value}", reference=0.5, reference_name="no membership signal",
                 n=min(row["n_members"], row["n_non_members"]), better="near 0.5", note="no bootstrap: strata are small")
    return report


# ------------------------------------------------------------------------------------------- utility


def _utility(card: Scorecard, inputs: ScoringInputs, settings: ScoringConfig, seed: int, cache: RealSideCache,
             tick) -> None:
    from .utility import augmentation_gain, train_on_synthetic_test_on_real

    evaluation, labels = inputs.evaluation, _labels(inputs)
    tasks = ([("segmentation", None)] if labels is not None else []) + [
        ("classification", a) for a in _scorable_attributes(inputs)]
    if not tasks:
        card.notes.append("utility: no task (needs masks on all sets, or a prompted attribute with two values)")
        return
    seeds = tuple(range(seed, seed + settings.utility_seeds))
    for task, attribute in tasks:
        stratum = attribute or "all labels"
        tstr = train_on_synthetic_test_on_real(
            inputs.synthetic, inputs.train, evaluation, labels=labels if task == "segmentation" else None,
            attribute=attribute, segmentation_plan=_plan(settings), classification_plan=_plan(settings, 32),
            seed=seed, n_boot=settings.bootstrap_samples, cache=cache)[task]
        summary = tstr["mean"] if task == "segmentation" else tstr
        metric = tstr["metric"]
        card.add("utility", f"{metric} train-on-synthetic", summary["synthetic"], stratum=stratum,
                 reference=summary["real"], reference_name="train-on-real", n=len(evaluation), better="near reference")
        card.add("utility", f"{metric} synthetic minus real", summary["difference"], stratum=stratum, reference=0.0,
                 reference_name="no loss", n=len(evaluation), better="higher")
        gain = augmentation_gain(inputs.train, inputs.synthetic, evaluation, fractions=settings.utility_fractions,
                                 seeds=seeds, task=task, labels=labels if task == "segmentation" else None,
                                 attribute=attribute, plan=_plan(settings, 16 if task == "segmentation" else 32),
                                 n_boot=settings.bootstrap_samples, bootstrap_seed=seed, cache=cache)
        for row in gain["fractions"]:
            card.add("utility", f"{metric} augmentation gain", row["gain"],
                     stratum=f"{stratum}, {row['fraction']:.0%} real", reference=row["real_only"],
                     reference_name="real only", n=len(evaluation), better="higher",
                     note=f"mean over {len(seeds)} seeds; augmented {row['augmented'].value:.3f}")
        tick()


def _plan(settings: ScoringConfig, batch_size: int = 16):
    from .utility import TrainingPlan

    return TrainingPlan(steps=settings.utility_steps, batch_size=batch_size)


# ----------------------------------------------------------------------------------------- a build


def build_sample_dir(config: RadsynthConfig) -> Path:
    """Where a build's samples are read from: ``scoring.sample_dir``, else <output_dir>/samples."""
    return Path(config.scoring.sample_dir or config.output_dir / "samples")


def build_scoring_cache_dir(config: RadsynthConfig) -> Path:
    """Where a build's real-side scoring work is kept (``real_side``): beside the preprocessed data it reads."""
    from ..data.ingest import data_dir

    return data_dir(config) / "scoring-cache"


def build_eval_dir(config: RadsynthConfig) -> Path:
    """Where ``evaluate`` writes a build's scorecard."""
    return config.output_dir / "eval"


def evaluate(config: RadsynthConfig, model_dir: str | Path | None = None, sample_dir: str | Path | None = None,
             out_dir: str | Path | None = None, log=print, map_batches: BatchMap = in_process) -> ScoreResult:
    """Score a build's samples (``scoring.sample_dir`` or <output_dir>/samples) against its real splits."""
    from ..sampling.generate import load_pipeline, sampler_settings
    from ..training import sampling_model_dir
    from .loading import cached_split, sample_set

    train = cached_split(config, "train")
    holdout = cached_split(config, "holdout")
    test = cached_split(config, "test")
    samples = Path(sample_dir or build_sample_dir(config))
    synthetic = sample_set(samples, train, max_samples=config.scoring.max_samples,
                           memory_mb=config.scoring.synthetic_memory_mb)
    extras = _sidecar_extras(samples, synthetic)
    translations = [extra["translation"] for extra in extras.values() if extra.get("translation")]
    model = Path(model_dir or sampling_model_dir(config))
    # The white-box probes (membership inference, round-trip copies) ask the generator that made the samples: never
    # the diffusion model about samples another method (the CycleGAN baseline) made.
    made_by_model = all(t.get("method", "diffusion") == "diffusion" for t in translations)
    pipeline = (load_pipeline(model, config, progress=False)
                if made_by_model and (model / "model_index.json").is_file() else None)
    if not made_by_model:
        log("scoring: the samples are translations by "
            f"{', '.join(sorted({t['method'] for t in translations} - {'diffusion'}))}: no white-box probes")
    attributes = config.scoring.attributes if config.scoring.attributes is not None else list(
        config.conditioning.attributes)
    sampler = None if pipeline is None else {key: value for key, value in sampler_settings(config, pipeline).items()
                                             if key in ("num_inference_steps", "guidance_scale")}
    truth = _paired_truth(config, samples, extras) if config.scoring.paired_truth else None
    inputs = ScoringInputs(synthetic, train, holdout, test, pipeline, attributes, sampler, truth,
                           _source_modalities(config, translations))
    return score(inputs, config.scoring, out_dir or build_eval_dir(config), seed=config.runtime.seed, log=log,
                 gate=config.release.gate, cache_dir=build_scoring_cache_dir(config), map_batches=map_batches)


def _sidecar_extras(samples: Path, synthetic: ImageSet) -> dict[str, dict]:
    """Each sample's sidecar entries beyond the common ones (a translation's ``source_case`` and ``translation``),
    by sample id in ``synthetic``'s order."""
    from ..sampling.sidecar import read_sidecar

    return {sample_id: read_sidecar(samples / f"{sample_id}.json").model_extra or {} for sample_id in synthetic.ids}


def _source_modalities(config: RadsynthConfig, translations: list[dict]) -> list[SourceModality]:
    """The real cases of each modality the samples were translated from, when scoring reads one other modality
    only (``scoring.modality``); without it, train and holdout already hold every modality."""
    from .loading import cached_split, split_records

    target = config.scoring.modality
    modalities = sorted({entry["from"] for entry in translations} - {None, target}) if target else []
    return [SourceModality(modality, *(cached_split(config, split, modality=modality) for split in ("train", "holdout")))
            for modality in modalities
            if all(split_records(config, split, modality) for split in ("train", "holdout"))]


def _paired_truth(config: RadsynthConfig, samples: Path, extras: dict[str, dict]) -> np.ndarray:
    """The paired rendering of each translated sample's source case (``scoring.paired_truth``), preprocessed as the
    model's data was, row for row with the samples (``extras``' order)."""
    from ..translation import source_cases

    folder = Path(config.scoring.paired_truth)
    truth = {case.record.case_id: case.image[0] for case in
             source_cases(config, folder, config.scoring.modality, [])}
    rows = []
    for sample_id, extra in extras.items():
        source = extra.get("source_case")
        if source is None:
            raise UserInputError(samples / f"{sample_id}.json", "not a translated sample (no source_case)",
                                 "scoring.paired_truth scores the samples `radsynth translate` writes")
        if source not in truth:
            raise UserInputError(folder, f"no case '{source}' (the source of sample {sample_id})",
                                 "the paired rendering of every translated source case, under its case id")
        rows.append(truth[source])
    return np.stack(rows).astype(np.float32)


def _check_compatible(inputs: ScoringInputs) -> None:
    shape = inputs.train.images.shape[1:]
    for image_set in (inputs.synthetic, inputs.holdout, inputs.test):
        if image_set is not None and image_set.images.shape[1:] != shape:
            raise UserInputError(image_set.name, f"images of shape {image_set.images.shape[1:]}",
                                 f"the training images' shape {shape}")
    for image_set, minimum in ((inputs.synthetic, 2), (inputs.train, 2), (inputs.holdout, 2)):
        if len(image_set) < minimum:
            raise UserInputError(image_set.name, f"{len(image_set)} images", f"at least {minimum} to score")


def _concatenate(a: ImageSet, b: ImageSet, name: str) -> ImageSet:
    masks = None if a.masks is None or b.masks is None else np.concatenate([a.masks, b.masks])
    return ImageSet(np.concatenate([a.images, b.images]), a.ids + b.ids, a.groups + b.groups, a.spacing,
                    a.intensity, a.is_synthetic, masks, a.conditions + b.conditions, a.prompts + b.prompts, name)


__all__ = ["Estimate", "ScoreResult", "ScoringInputs", "SourceModality", "evaluate", "score"]

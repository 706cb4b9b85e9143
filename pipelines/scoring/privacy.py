"""Privacy leakage: does a synthetic set copy its training images?

Four views, all against the training set and read next to an unseen real set (the holdout) that tells what
"close by chance" looks like for real data of this kind:

- pixel nearest neighbour: per synthetic sample, the most correlated training image, tolerating flips and small
  shifts (what a person would call a copy);
- copy detection in an embedding space, with a threshold calibrated on known near copies of training images;
- DCR share: how often a synthetic sample is closer to the training set than to the holdout, both matched in
  patients and rows, with a joint bootstrap CI (0.5 for a generator that has not memorised);
- authenticity (Alaa et al. 2022): a sample closer to its nearest training point than that point's own nearest
  training neighbour is probably a copy; compared with the rate for holdout images.

``privacy_decision`` turns the scorecard rows of these into pass/fail with reasons. All searches go through
``chunked_nearest_neighbours``, so memory stays bounded for large sets.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import hypergeom

from radsynth.pipelines.scoring.bootstrap import bootstrap
from radsynth.pipelines.scoring.nearest_neighbours import chunked_nearest_neighbours

__all__ = [
    "CopyDetector",
    "PixelMatches",
    "authenticity",
    "authenticity_report",
    "copy_detection_threshold",
    "dcr_share",
    "matched_references",
    "nearest_similarity",
    "pixel_nearest_neighbours",
    "threshold_at_false_positive_rate",
]


# ------------------------------------------------------------------------------------------ pixel nearest neighbour


@dataclass
class PixelMatches:
    """Per synthetic sample, its best-matching training image in pixel space.

    correlation: best Pearson correlation over training images, flips and shifts (1 = a copy up to brightness and
        contrast). normalised_l2: RMS difference of the two matched crops after each is z-scored (0 = a copy;
        equals sqrt(2 * (1 - correlation))). train_index: the matched training image. flip_axis: spatial axis the
        synthetic image was mirrored along to match, -1 for none. shift: (N, spatial_dims) offset of the
        synthetic crop from the centred one, in comparison-grid pixels. comparison_shape: the grid compared on.
    """

    correlation: np.ndarray
    normalised_l2: np.ndarray
    train_index: np.ndarray
    flip_axis: np.ndarray
    shift: np.ndarray
    comparison_shape: tuple[int, ...]

    def flags(self, threshold: float) -> np.ndarray:
        """Samples whose best correlation reaches ``threshold`` (see ``threshold_at_false_positive_rate``)."""
        # In float64: a float32 array compared with a Python float is compared in float32 (NumPy 2), which
        # would round a threshold set just above the highest holdout score back down onto it.
        return self.correlation.astype(np.float64) >= threshold


def _comparison_grid(images: np.ndarray | torch.Tensor, comparison_size: int, chunk: int) -> torch.Tensor:
    """Images (N, *spatial) as float32, area-averaged so that no side exceeds ``comparison_size``.

    Averaging (not point sampling) keeps every pixel's content in the comparison, and a smaller grid makes the
    search cheap: 1000 x 1000 images at 256^2 cost the same as at 64^2. Aspect ratio is kept.
    """
    images = torch.as_tensor(images)
    spatial = tuple(images.shape[1:])
    scale = comparison_size / max(spatial)
    if scale >= 1.0:
        return images.to(torch.float32)
    size = tuple(max(1, round(n * scale)) for n in spatial)
    parts = [F.interpolate(images[i:i + chunk, None].to(torch.float32), size=size, mode="area")[:, 0]
             for i in range(0, len(images), chunk)]
    return torch.cat(parts)


def _centred_rows(crops: torch.Tensor) -> torch.Tensor:
    """Rows with their mean removed: cosine similarity of centred rows is the Pearson correlation."""
    rows = crops.reshape(len(crops), -1)
    return rows - rows.mean(1, keepdim=True)


def pixel_nearest_neighbours(
    synthetic: np.ndarray | torch.Tensor,
    train: np.ndarray | torch.Tensor,
    max_shift: int = 2,
    flips: bool | Sequence[int] = True,
    comparison_size: int = 64,
    chunk: int = 512,
) -> PixelMatches:
    """Best normalised correlation of each synthetic image with any training image, up to flips and small shifts.

    synthetic, train: (N, *spatial) images (2D or 3D) in [-1, 1] on one grid. Both are first area-downsampled
    so that no side exceeds ``comparison_size``; ``max_shift`` counts pixels of that comparison grid.
    Shifts: the training images are cropped by ``max_shift`` on every side, and each synthetic image is cropped
    at every offset within ``max_shift`` (no wrap-around), so a copy moved by up to ``max_shift`` pixels still
    lines up exactly. Flips: ``True`` mirrors along each spatial axis in turn (not combinations), ``False``
    none, or a sequence of spatial axes (0-based). Cost is (flips + 1) * (2 * max_shift + 1)^spatial_dims
    chunked searches.
    """
    query_grid = _comparison_grid(synthetic, comparison_size, chunk)
    train_grid = _comparison_grid(train, comparison_size, chunk)
    if query_grid.shape[1:] != train_grid.shape[1:]:
        raise ValueError(f"synthetic images {tuple(query_grid.shape[1:])} and training images "
                         f"{tuple(train_grid.shape[1:])} are not on one grid")
    spatial_dims = query_grid.ndim - 1
    shape = tuple(query_grid.shape[1:])
    if min(shape) <= 2 * max_shift:
        raise ValueError(f"max_shift={max_shift} leaves nothing to compare on a {shape} comparison grid")
    flip_axes = list(range(spatial_dims)) if flips is True else [] if flips is False else [int(a) for a in flips]
    crop = tuple(n - 2 * max_shift for n in shape)
    centre = (slice(None),) + tuple(slice(max_shift, max_shift + c) for c in crop)
    train_rows = _centred_rows(train_grid[centre])

    n = len(query_grid)
    best = torch.full((n,), torch.inf, dtype=torch.float32)  # cosine distance = 1 - correlation
    best_rows = torch.zeros_like(train_rows[:1]).expand(n, -1).clone()
    train_index = torch.zeros(n, dtype=torch.int64)
    flip_axis = torch.full((n,), -1, dtype=torch.int64)
    shift = torch.zeros((n, spatial_dims), dtype=torch.int64)
    for axis in [-1, *flip_axes]:
        variant = query_grid if axis < 0 else query_grid.flip(1 + axis)
        for offsets in itertools.product(range(2 * max_shift + 1), repeat=spatial_dims):
            window = (slice(None),) + tuple(slice(o, o + c) for o, c in zip(offsets, crop))
            rows = _centred_rows(variant[window])
            # Rank every variant with the fast expansion; only the winners get exact distances below.
            distance, index = chunked_nearest_neighbours(rows, train_rows, k=1, metric="cosine", chunk=chunk,
                                                         exact=False)
            better = distance[:, 0] < best
            best = torch.where(better, distance[:, 0], best)
            train_index = torch.where(better, index[:, 0], train_index)
            best_rows[better] = rows[better]
            flip_axis[better] = axis
            shift[better] = torch.tensor(offsets) - max_shift
    distance = _exact_cosine_distance(best_rows, train_rows[train_index]).clamp_min(0.0).numpy()
    return PixelMatches(correlation=1.0 - distance, normalised_l2=np.sqrt(2.0 * distance), train_index=train_index.numpy(),
                        flip_axis=flip_axis.numpy(), shift=shift.numpy(), comparison_shape=crop)


def _exact_cosine_distance(rows: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` of paired rows as ``|a/|a| - b/|b||^2 / 2``: exactly 0 for rows equal up to scale."""
    tiny = torch.finfo(rows.dtype).tiny
    unit = rows / rows.norm(dim=1, keepdim=True).clamp_min(tiny)
    unit -= others / others.norm(dim=1, keepdim=True).clamp_min(tiny)
    return (unit * unit).sum(1) / 2.0


def threshold_at_false_positive_rate(holdout_scores: np.ndarray, false_positive_rate: float = 0.01) -> float:
    """The smallest score that at most ``false_positive_rate`` of holdout images reach (flag: score >= threshold).

    holdout_scores: each unseen real image's similarity to the training set (pixel correlation or embedding
    similarity): how similar a real image is by chance. Scores above every holdout score get the next float up.
    """
    scores = np.sort(np.asarray(holdout_scores, dtype=np.float64))
    allowed = int(np.floor(false_positive_rate * len(scores) + 1e-9))
    return float(np.nextafter(scores[len(scores) - allowed - 1], np.inf))


# ------------------------------------------------------------------------------------------ copy detection


def nearest_similarity(embeddings: np.ndarray, train_embeddings: np.ndarray,
                       chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Each embedding's highest cosine similarity to any training embedding, and that training row's index."""
    distance, index = chunked_nearest_neighbours(np.asarray(embeddings), np.asarray(train_embeddings), k=1,
                                                 metric="cosine", chunk=chunk)
    return 1.0 - distance[:, 0], index[:, 0]


def copy_detection_threshold(source_embeddings: np.ndarray, copy_embeddings: np.ndarray, recall: float = 0.95, *,
                             train_embeddings: np.ndarray | None = None, copy_kinds: Sequence[str] | None = None,
                             chunk: int = 1024) -> float:
    """Cosine-similarity threshold that flags ``recall`` of known near copies of training images.

    source_embeddings: embeddings of training images; copy_embeddings: row i embeds a near copy of source row i
    (augmentation, autoencoder round trip, ...). A copy's score is its similarity to its nearest neighbour in the
    whole training set (``train_embeddings``, by default the sources), which is what a synthetic sample gets
    scored by too. The threshold is the largest value that at least ``recall`` of the copies reach.
    copy_kinds: optional label per copy (``"noise"``, ``"shift"``, ``"vae"``, ...): the threshold then reaches
    ``recall`` within every kind (the lowest per-kind threshold), so a kind the embedding tolerates less well
    is not left mostly undetected behind easy ones that fill the overall quota.
    """
    if len(source_embeddings) != len(copy_embeddings):
        raise ValueError(f"{len(copy_embeddings)} copies for {len(source_embeddings)} sources: row i must copy row i")
    if not 0.0 < recall <= 1.0:
        raise ValueError(f"recall must be in (0, 1], got {recall}")
    reference = source_embeddings if train_embeddings is None else train_embeddings
    similarity, _ = nearest_similarity(copy_embeddings, reference, chunk)
    kinds = np.zeros(len(similarity), dtype=int) if copy_kinds is None else np.asarray(copy_kinds, dtype=object)
    if len(kinds) != len(similarity):
        raise ValueError(f"{len(kinds)} copy kinds for {len(similarity)} copies")
    thresholds = []
    for kind in np.unique(kinds):
        scores = np.sort(similarity[kinds == kind].astype(np.float64))
        thresholds.append(scores[int(np.floor((1.0 - recall) * len(scores) + 1e-9))])
    return float(min(thresholds))


@dataclass(frozen=True)
class CopyDetector:
    """A calibrated copy detector: a sample is a copy when its nearest training embedding is at least this similar.

    threshold: cosine similarity; recall: share of calibration copies (of each kind) it flags, by construction;
    n_calibration: number of calibration copies, to report with the threshold.
    """

    threshold: float
    recall: float
    n_calibration: int = 0
    achieved_recall: float | None = None  # after a false-positive ceiling raised the threshold
    holdout_false_positive_rate: float | None = None

    @classmethod
    def calibrate(cls, source_embeddings: np.ndarray, copy_embeddings: np.ndarray, recall: float = 0.95, *,
                  train_embeddings: np.ndarray | None = None, copy_kinds: Sequence[str] | None = None,
                  chunk: int = 1024) -> CopyDetector:
        """Calibrate on near copies; arguments as in ``copy_detection_threshold``."""
        threshold = copy_detection_threshold(source_embeddings, copy_embeddings, recall,
                                             train_embeddings=train_embeddings, copy_kinds=copy_kinds, chunk=chunk)
        return cls(threshold, recall, len(copy_embeddings))

    def with_false_positive_ceiling(self, copy_embeddings: np.ndarray, holdout_embeddings: np.ndarray,
                                    train_embeddings: np.ndarray, max_false_positive_rate: float = 0.01,
                                    chunk: int = 1024) -> CopyDetector:
        """Raise the threshold, if needed, so that at most ``max_false_positive_rate`` of unseen real images are
        flagged, and report the recall left on the calibration copies.

        An embedding that cannot tell copies from new patients (a weak encoder, near-identical anatomy) would
        otherwise reach its recall target by flagging everything: holdout included, and the copy check would
        say nothing. With the ceiling the detector stays specific and its reduced recall is reported instead.
        """
        holdout_similarity, _ = nearest_similarity(holdout_embeddings, train_embeddings, chunk)
        holdout_similarity = np.asarray(holdout_similarity, np.float64)
        ceiling = threshold_at_false_positive_rate(holdout_similarity, max_false_positive_rate)
        threshold = max(self.threshold, ceiling)
        copy_similarity = np.asarray(nearest_similarity(copy_embeddings, train_embeddings, chunk)[0], np.float64)
        return CopyDetector(threshold, self.recall, self.n_calibration,
                            achieved_recall=float((copy_similarity >= threshold).mean()),
                            holdout_false_positive_rate=float((holdout_similarity >= threshold).mean()))

    def flags(self, embeddings: np.ndarray, train_embeddings: np.ndarray,
              chunk: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(flagged as copy, similarity to the nearest training embedding, its index) per embedding."""
        similarity, index = nearest_similarity(embeddings, train_embeddings, chunk)
        return np.asarray(similarity, np.float64) >= self.threshold, similarity, index

    def false_positive_rate(self, holdout_embeddings: np.ndarray, train_embeddings: np.ndarray,
                            chunk: int = 1024) -> float:
        """Share of unseen real images flagged as copies: the rate a private generator would also get."""
        return float(self.flags(holdout_embeddings, train_embeddings, chunk)[0].mean())


# ------------------------------------------------------------------------------------------ DCR share


class _ResampledNearest:
    """NN distance of synthetic rows to a bootstrap resample of a reference set, without a new search per replicate.

    A resample draws references with replacement, so a sample's nearest drawn reference is the first of its
    precomputed candidates (sorted by distance) that was drawn. When none of its candidates was drawn (rare: each
    is missed with probability about 1/e), that sample is searched again against the drawn references.
    """

    def __init__(self, synthetic: torch.Tensor, reference: torch.Tensor, n_candidates: int, chunk: int) -> None:
        self.synthetic, self.reference, self.chunk = synthetic, reference, chunk
        self.distances, self.indices = chunked_nearest_neighbours(synthetic, reference, k=min(n_candidates, len(reference)),
                                                                  chunk=chunk)
        self.distances, self.indices = self.distances.numpy(), self.indices.numpy()

    def __call__(self, rows: np.ndarray, drawn: np.ndarray) -> np.ndarray:
        is_drawn = np.zeros(len(self.reference), dtype=bool)
        is_drawn[drawn] = True
        hit = is_drawn[self.indices[rows]]
        first = hit.argmax(1)
        distances = self.distances[rows, first]
        missed = ~hit[np.arange(len(rows)), first]
        if missed.any():
            present = np.flatnonzero(is_drawn)
            searched, _ = chunked_nearest_neighbours(self.synthetic[rows[missed]], self.reference[present], k=1,
                                                     chunk=self.chunk)
            distances[missed] = searched[:, 0].numpy()
        return distances


def matched_references(train_groups: Sequence[str], holdout_groups: Sequence[str],
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Sorted row indices of train and of holdout with as many patients and as many rows in each (seeded).

    Matching rows alone is not enough where patients have several cases (revisits, slices of one volume): 9
    holdout cases of 5 patients against 9 training cases of 9 patients leave the training reference more
    diverse, so unseen samples land nearer to it and a private generator looks like it memorises. Each set keeps
    the same number of patients (the smaller set's), then the larger row count is cut to the smaller one keeping
    at least one row of every chosen patient. With one row per patient this is plain size matching.
    """
    chosen = []
    for name, groups in (("train", train_groups), ("holdout", holdout_groups)):
        if not len(groups):
            raise ValueError(f"dcr_share: the {name} reference is empty")
        by_patient: dict[str, list[int]] = {}
        for row, group in enumerate(groups):
            by_patient.setdefault(group, []).append(row)
        chosen.append(list(by_patient.values()))
    n_patients = min(len(patients) for patients in chosen)
    chosen = [[patients[i] for i in rng.choice(len(patients), n_patients, replace=False)] for patients in chosen]
    n_rows = min(sum(map(len, patients)) for patients in chosen)
    picks = []
    for patients in chosen:
        one_each = np.array([rows[rng.integers(len(rows))] for rows in patients])
        rest = np.setdiff1d(np.concatenate([np.asarray(rows) for rows in patients]), one_each)
        fill = rng.choice(rest, n_rows - n_patients, replace=False)
        picks.append(np.sort(np.concatenate([one_each, fill]).astype(np.int64)))
    return picks[0], picks[1]


def _closer_to_train(d_train: np.ndarray, d_holdout: np.ndarray) -> np.ndarray:
    """1 where closer to train, 0 where closer to holdout, 1/2 on ties (an exact tie favours neither)."""
    return (d_train < d_holdout) + 0.5 * (d_train == d_holdout)


def dcr_share(
    synthetic: np.ndarray,
    train: np.ndarray,
    holdout: np.ndarray,
    synthetic_groups: Sequence[str],
    train_groups: Sequence[str],
    holdout_groups: Sequence[str],
    n_boot: int = 200,
    seed: int = 0,
    chunk: int = 1024,
    n_candidates: int = 32,
) -> dict:
    """Distance to closest record: the share of synthetic samples closer to the training set than to the holdout.

    synthetic, train, holdout: (N, ...) feature vectors (or images; rows are flattened), Euclidean distance.
    Groups: the bootstrap unit of each row (patient id for real images, own id for synthetic ones).
    The references are matched (``matched_references``) in patients and rows: with more points, or points from
    more patients, a set has smaller nearest-neighbour distances by chance, which would push the share away from
    0.5 for a private generator. A private generator scores 0.5; a memorising one more.

    Returns {"share": Estimate, "dcr_train": per-sample NN distance to the *whole* training set (for per-sample
    flags and ``min_dcr``, so no copy is missed by the subsampling), "dcr_train_matched": to the size-matched
    training subsample, "dcr_holdout": to the (size-matched) holdout, "closer_to_train": per sample 1, 0 or 1/2
    (tie) on the matched references (what the share averages; per-stratum shares average it over their rows),
    "nn_train_index": index into ``train`` of each sample's nearest training row, "min_dcr": float,
    "n_reference": size of each matched reference}.
    """
    synthetic_rows = torch.as_tensor(np.asarray(synthetic)).reshape(len(synthetic), -1)
    train_rows = torch.as_tensor(np.asarray(train)).reshape(len(train), -1)
    holdout_rows = torch.as_tensor(np.asarray(holdout)).reshape(len(holdout), -1)
    for name, rows, groups in (("synthetic", synthetic_rows, synthetic_groups), ("train", train_rows, train_groups),
                               ("holdout", holdout_rows, holdout_groups)):
        if len(rows) != len(groups):
            raise ValueError(f"dcr_share: {len(rows)} {name} rows but {len(groups)} {name} groups")
    train_pick, holdout_pick = matched_references(train_groups, holdout_groups, np.random.default_rng(seed))
    n_reference = len(train_pick)

    dcr_train, nn_train_index = chunked_nearest_neighbours(synthetic_rows, train_rows, k=1, chunk=chunk)
    to_train = _ResampledNearest(synthetic_rows, train_rows[train_pick], n_candidates, chunk)
    to_holdout = _ResampledNearest(synthetic_rows, holdout_rows[holdout_pick], n_candidates, chunk)

    def share(synthetic_index: np.ndarray, train_index: np.ndarray, holdout_index: np.ndarray) -> float:
        rows, inverse = np.unique(synthetic_index, return_inverse=True)
        closer = _closer_to_train(to_train(rows, train_index), to_holdout(rows, holdout_index))
        return float(closer[inverse].mean())

    # Joint bootstrap: every replicate redraws the synthetic samples AND the patients of both reference sets. The
    # share depends on which real patients happen to be in train and holdout as much as on the synthetic draw; a
    # binomial test over synthetic samples alone treats the references as fixed, understates the spread and
    # rejects a private generator far more often than its nominal rate.
    estimate = bootstrap(share, [list(synthetic_groups), [train_groups[i] for i in train_pick],
                                 [holdout_groups[i] for i in holdout_pick]], n_boot=n_boot, seed=seed)
    all_rows = np.arange(len(synthetic_rows))
    dcr_train_matched = to_train(all_rows, np.arange(n_reference))
    dcr_holdout = to_holdout(all_rows, np.arange(n_reference))
    return {
        "share": estimate,
        "dcr_train": dcr_train[:, 0].numpy(),
        "dcr_train_matched": dcr_train_matched,
        "dcr_holdout": dcr_holdout,
        "closer_to_train": _closer_to_train(dcr_train_matched, dcr_holdout),
        "nn_train_index": nn_train_index[:, 0].numpy(),
        "min_dcr": float(dcr_train.min()),
        "n_reference": n_reference,
    }


# ------------------------------------------------------------------------------------------ authenticity


def _authentic(queries: np.ndarray, train: np.ndarray, train_self_distance: np.ndarray,
               chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """(authentic or not, distance to the nearest training row) per query."""
    distance, index = chunked_nearest_neighbours(np.asarray(queries).reshape(len(queries), -1), train, k=1, chunk=chunk)
    distance, index = distance[:, 0], index[:, 0]
    return (distance >= train_self_distance[index]) & (distance > 0), distance


def _train_self_distance(train: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    rows = np.asarray(train).reshape(len(train), -1)
    distance, _ = chunked_nearest_neighbours(rows, rows, k=1, chunk=chunk, exclude_self=True)
    return rows, distance[:, 0]


def authenticity(synthetic: np.ndarray, train: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Per synthetic sample, whether it is authentic (Alaa et al. 2022, "How faithful is your synthetic data?").

    A sample is unauthentic when it lies closer to its nearest training point than that training point lies to
    any other training point: closer than the data's own spacing there, so likely a copy. An exact copy (distance
    0) is unauthentic even where the training set holds duplicates. Euclidean distance on flattened rows.
    """
    rows, self_distance = _train_self_distance(train, chunk)
    return _authentic(synthetic, rows, self_distance, chunk)[0]


def authenticity_report(synthetic: np.ndarray, train: np.ndarray, holdout: np.ndarray, chunk: int = 1024) -> dict:
    """Authentic share of the synthetic set next to the same share for unseen real images (the baseline).

    Real holdout images are not copies, yet some fall closer to a training point than its neighbours by chance;
    a private generator matches that baseline. Returns {"per_sample": authentic or not per synthetic sample,
    "synthetic": authentic share of the synthetic set, "holdout_baseline": authentic share of the holdout images
    scored as if synthetic, "difference": synthetic minus baseline, "holdout_min_distance": the closest any
    holdout image comes to a training point (how near unseen real data gets; an exact copy is far nearer)}.
    """
    rows, self_distance = _train_self_distance(train, chunk)
    authentic, _ = _authentic(synthetic, rows, self_distance, chunk)
    holdout_authentic, holdout_distance = _authentic(holdout, rows, self_distance, chunk)
    baseline, share = float(holdout_authentic.mean()), float(authentic.mean())
    return {"per_sample": authentic, "synthetic": share, "holdout_baseline": baseline, "difference": share - baseline,
            "holdout_min_distance": float(holdout_distance.min())}


# ------------------------------------------------------------------------------------------ verdict


def copy_rate_limit(copy_rate: float, holdout_copy_rate: float, copy_margin: float = 0.01, max_sd: float = 2.0,
                    n_synthetic: int | None = None, n_holdout: int | None = None) -> float:
    """The highest synthetic copy rate a private generator may show: the holdout's rate + ``copy_margin``, plus
    ``max_sd`` standard errors of the difference of two binomial rates (pooled) when both sizes are known."""
    limit = holdout_copy_rate + copy_margin
    if n_synthetic and n_holdout:
        pooled = (copy_rate * n_synthetic + holdout_copy_rate * n_holdout) / (n_synthetic + n_holdout)
        limit += max_sd * float(np.sqrt(pooled * (1.0 - pooled) * (1.0 / n_synthetic + 1.0 / n_holdout)))
    return float(limit)


def membership_tpr_limit(tpr_max: float, n: int, false_positive_rate: float = 0.01, significance: float = 0.05) -> float:
    """``tpr_max``, or what an attack without any signal exceeds by chance with probability ``significance``.

    Members and non-members are equally many (``n`` each). The threshold lets ``j - 1 = floor(0.01 n)`` non-members through,
    so a signal-free attack finds at least k members above it exactly when at least k of the top ``k + j - 1``
    scores are members: a hypergeometric tail. With the 37 holdout images of the demo that tail puts up to 4
    members (TPR 0.11) above every non-member by chance: a fixed 2% would refuse a private generator about half
    the time. At large n the chance quantile falls below ``tpr_max`` and the limit is ``tpr_max``.
    """
    allowed = int(np.floor(false_positive_rate * n))
    chance_members = next(k for k in range(n + 1)
                          if hypergeom.sf(k, 2 * n, n, k + 1 + allowed) <= significance)  # P(K > k) under no signal
    return max(tpr_max, chance_members / n)

"""The mask bank: label maps drawn from the real training split and augmented, for mask-conditioned generation.

A ControlNet draws what its label map says, so the masks it is conditioned on decide how plausible the
anatomy of a generated image is. The bank's masks are real training label maps made new by small, anatomy-
respecting changes: a left-right mirror that keeps "right_lung" on the patient's right, a size change of a
few percent, and a smooth elastic warp. Each mask says which case it came from (``derived_from_real``), so
privacy scoring can treat its images as derived from that case.

Only the ``train`` split is ever read: ``holdout`` and ``test`` stay unseen, since they are the privacy and
evaluation references. Masks are read from the preprocessed cache (the grid the generator trains on), one
file per draw, so a 3D dataset never has to fit in memory.

Every augmentation is drawn from the caller's rng and recorded with its drawn parameters; the elastic field
is generated from a seed drawn from that rng and recorded too, so a mask can be rebuilt from its source and
its provenance. Augmentations never erase a label: one that would (a 3-voxel nodule lost to a downscale) is
left out for that draw, so a bank filtered on a finding yields masks that still show it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import safe_open
from scipy import ndimage

from radsynth.configs.errors import UserInputError
from radsynth.configs.schema import RadsynthConfig
from radsynth.pipelines.data.cache import cache_key
from radsynth.pipelines.data.ingest import data_dir
from radsynth.pipelines.data.io import spacing_of
from radsynth.pipelines.data.manifest import AttributeValue, CaseRecord, read_manifest
from radsynth.pipelines.data.phantoms.shapes import smooth_noise

from .lesion_edits import (
    RADIOGRAPH_ORIENTATION,
    LabelVocabulary,
    Orientation,
    default_orientation,
    orientation_from_affine,
    phrase_of,
    side_of,
)

WHERE = "mask_bank"
TRAIN_SPLIT = "train"
# Attribute name -> the value, or any of the values, a case must have: {"finding": ["nodule", "mass"]}.
AttributeFilter = Mapping[str, AttributeValue | Sequence[AttributeValue]]

# Unsided organs that lie on one side of the body: mirroring a map that holds one moves it to the wrong side
# (heart on the right, liver on the left: situs inversus), which no training image shows. Matched by word, so
# "liver_tumour" and "heart_ventricle" count too.
LATERALISED_ORGAN_WORDS = frozenset({
    "heart", "liver", "hepatic", "spleen", "stomach", "pancreas", "gallbladder", "aorta", "duodenum",
    "oesophagus", "esophagus", "cava", "appendix", "caecum", "cecum", "sigmoid",
})


def _check(condition: bool, problem: str, allowed: str | None = None) -> None:
    if not condition:
        raise UserInputError(WHERE, problem, allowed)


@dataclass(frozen=True)
class BankAugmentation:
    """How the bank changes a drawn mask. Each step has its own probability; set one to 0 to turn it off.

    - ``lr_flip_probability`` 0.5: a left-right mirror with sided labels swapped is the one flip that keeps
      paired anatomy plausible, so half the draws get it. It is not applied to a map holding a lateralised
      organ (``LATERALISED_ORGAN_WORDS``: heart, liver, spleen...) unless ``flip_lateralised_anatomy``, since
      the mirror would put it on the wrong side; nor to one holding a sided label without its counterpart.
    - ``cc_flip_probability`` 0: anatomy is not up-down symmetric (apices above bases, brain above neck).
    - ``scale_range`` 0.9-1.1 (probability 0.5): +-10% is within the spread of adult body and organ sizes;
      more pushes anatomy out of the field of view or shrinks small lesions below the grid.
    - ``elastic_sigma`` 8 voxels, ``elastic_magnitude`` 1 voxel (probability 0.5): a divergence-free field
      with features about 8 voxels across (a quarter of a 32-voxel grid) and an RMS shift of 1 voxel moves
      2-10% of the phantoms' voxels to another label, while organs of 500+ voxels keep their volume within
      ~5%; stronger fields tore the 32^3 CT phantom's kidneys and vertebrae apart.
    - ``smooth_sigma`` 1 voxel: nearest-neighbour resampling leaves one-voxel staircase edges that no real
      segmentation has; after any resampling each label is Gaussian-smoothed and the strongest one wins per
      voxel. 0 turns it off. It never removes a label.
    """

    lr_flip_probability: float = 0.5
    flip_lateralised_anatomy: bool = False
    cc_flip_probability: float = 0.0
    scale_probability: float = 0.5
    scale_range: tuple[float, float] = (0.9, 1.1)
    elastic_probability: float = 0.5
    elastic_sigma: float = 8.0
    elastic_magnitude: float = 1.0
    smooth_sigma: float = 1.0

    def __post_init__(self):
        for name in ("lr_flip_probability", "cc_flip_probability", "scale_probability", "elastic_probability"):
            value = getattr(self, name)
            _check(0.0 <= value <= 1.0, f"augmentation {name} {value}", "allowed: 0 <= probability <= 1")
        low, high = self.scale_range
        _check(0.0 < low <= high, f"augmentation scale_range {self.scale_range}", "a (min, max) pair, 0 < min <= max")
        _check(self.elastic_sigma > 0 and self.elastic_magnitude >= 0,
               f"augmentation elastic sigma {self.elastic_sigma}, magnitude {self.elastic_magnitude}",
               "sigma > 0 and magnitude >= 0, in voxels")
        _check(self.smooth_sigma >= 0, f"augmentation smooth_sigma {self.smooth_sigma}", "0 (off) or more voxels")


# The case's own map as it is: what lesion inpainting needs, since the map must match the real image under it.
NO_AUGMENTATION = BankAugmentation(lr_flip_probability=0.0, scale_probability=0.0, elastic_probability=0.0,
                                   smooth_sigma=0.0)


@dataclass(frozen=True)
class BankEntry:
    """One training case's label map: in memory, or a cache file read on each draw.

    ``label_map`` is spatial or, as in the cache, has one leading channel axis; ``spacing`` has one value per
    spatial axis. ``orientation`` None means the bank's (by default the built-in phantoms' layout).
    """

    case_id: str
    label_map: np.ndarray | Path
    spacing: tuple[float, ...]
    attributes: Mapping[str, AttributeValue] = field(default_factory=dict)
    orientation: Orientation | None = None

    @property
    def ndim(self) -> int:
        return len(self.spacing)

    def load(self) -> np.ndarray:
        if isinstance(self.label_map, np.ndarray):
            return self.label_map
        with safe_open(str(self.label_map), framework="numpy") as handle:
            return handle.get_tensor("label")

    def load_image(self) -> np.ndarray:
        """The case's preprocessed image (in [-1, 1]), from the cache file the map came from."""
        if isinstance(self.label_map, np.ndarray):
            raise ValueError(f"bank entry {self.case_id} holds a map in memory, with no image beside it")
        with safe_open(str(self.label_map), framework="numpy") as handle:
            return handle.get_tensor("image")


@dataclass(frozen=True)
class BankMask:
    """A drawn mask: the augmented label map (shape and dtype of the stored one) and where it came from.

    ``attributes`` are the source case's, with "right" and "left" values swapped when the map was mirrored
    (a right-sided nodule is left-sided after the flip); measured sizes among them are the source's.
    """

    label_map: np.ndarray
    spacing: tuple[float, ...]
    label_names: dict[int, str]
    orientation: Orientation
    attributes: dict[str, AttributeValue]
    provenance: dict


class MaskBank:
    """Training label maps to draw augmented masks from; see the module docstring.

    ``entries`` are the caller's training cases (``BankEntry`` or ``(case_id, label_map, spacing, attributes)``
    tuples), all labelled with ``label_names``; ``from_ingest`` and ``from_records`` build a bank from an
    ingested dataset's train split. ``where`` keeps cases whose attributes match (a value or a list of
    allowed values per attribute, e.g. ``{"finding": "nodule"}``); ``require_labels`` keeps cases whose map
    holds every named label.
    """

    def __init__(
        self,
        entries: Sequence[BankEntry | tuple],
        label_names: Mapping[int | str, str],
        augmentation: BankAugmentation = BankAugmentation(),
        where: AttributeFilter | None = None,
        require_labels: Sequence[str] = (),
        orientation: Orientation | None = None,
    ):
        self.label_names = {int(value): str(name) for value, name in label_names.items()}
        self.vocabulary = LabelVocabulary(self.label_names)
        self.augmentation = augmentation
        self.orientation = orientation
        entries = [entry if isinstance(entry, BankEntry) else BankEntry(*entry) for entry in entries]
        _check(bool(entries), "no training cases to draw masks from", "ingest a dataset with a train split")
        present = [self._label_values(entry) for entry in entries]
        chosen = _matching(entries, present, dict(where or {}), self._required_values(require_labels))
        self.entries = [entries[i] for i in chosen]
        self._present = [present[i] for i in chosen]
        self._swap = _LeftRightSwap(self.vocabulary)

    @classmethod
    def from_ingest(
        cls,
        config: RadsynthConfig,
        augmentation: BankAugmentation = BankAugmentation(),
        where: AttributeFilter | None = None,
        require_labels: Sequence[str] = (),
        orientation: Orientation | None = None,
    ) -> MaskBank:
        """The bank of an ingested dataset (``radsynth ingest CONFIG``): its manifest's train cases, read from
        the preprocessed cache that ``config.data`` keys."""
        records = read_manifest(data_dir(config) / "manifest.jsonl")
        cache_dir = data_dir(config) / "cache" / cache_key(config.data)
        return cls.from_records(records, cache_dir, augmentation, where, require_labels, orientation)

    @classmethod
    def from_records(
        cls,
        records: Sequence[CaseRecord],
        cache_dir: str | Path,
        augmentation: BankAugmentation = BankAugmentation(),
        where: AttributeFilter | None = None,
        require_labels: Sequence[str] = (),
        orientation: Orientation | None = None,
    ) -> MaskBank:
        """The bank of the train-split records that have a label map, read from ``cache_dir`` on each draw.

        3D maps take their orientation from the cached (RAS) affine; 2D ones are taken as frontal films in
        radiographic display, as the built-in chest phantoms are; ``orientation`` overrides both.
        """
        train = [record for record in records if record.split == TRAIN_SPLIT and record.label is not None]
        _check(bool(train), "no labelled cases in the train split", "ingest a dataset with label maps first")
        vocabularies = {tuple(sorted(record.label_names.items())) for record in train}
        _check(len(vocabularies) == 1, f"the train cases use {len(vocabularies)} different label vocabularies",
               "set data.label_names so every case shares one")
        entries = [_cached_entry(record, Path(cache_dir), orientation) for record in train]
        return cls(entries, train[0].label_names, augmentation, where, require_labels, orientation)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def case_ids(self) -> list[str]:
        return [entry.case_id for entry in self.entries]

    def draw(self, rng: np.random.Generator, n: int = 1) -> list[BankMask]:
        """``n`` masks, each from a training case chosen uniformly and augmented with ``rng``."""
        return [self._draw_one(rng) for _ in range(n)]

    def _draw_one(self, rng: np.random.Generator) -> BankMask:
        index = int(rng.integers(len(self.entries)))
        entry, present = self.entries[index], self._present[index]
        stored = entry.load()
        orientation = self._orientation_of(entry)
        augmenter = _Augmenter(stored.reshape(stored.shape[-entry.ndim:]).copy(), present, orientation,
                               self.augmentation, self._swap, rng)
        label_map, applied = augmenter.run()
        mirrored = any(step["name"] == "flip_left_right" for step in applied)
        return BankMask(
            label_map=label_map.reshape(stored.shape),
            spacing=tuple(float(s) for s in entry.spacing),
            label_names=dict(self.label_names),
            orientation=orientation,
            attributes=_mirrored_attributes(entry.attributes) if mirrored else dict(entry.attributes),
            provenance={"mask_source": "bank", "derived_from_real": True, "source_case_id": entry.case_id,
                        "augmentations": applied},
        )

    def entry(self, case_id: str) -> BankEntry:
        return next(entry for entry in self.entries if entry.case_id == case_id)

    @property
    def grid_orientation(self) -> Orientation:
        """The orientation of the bank's grid: its first case's (a dataset shares one preprocessed grid)."""
        return self._orientation_of(self.entries[0])

    def _orientation_of(self, entry: BankEntry) -> Orientation:
        return entry.orientation or self.orientation or default_orientation(entry.ndim)

    def _label_values(self, entry: BankEntry) -> frozenset[int]:
        """The labels in an entry's map, checked against its spacing, orientation and the vocabulary."""
        label_map, ndim = entry.load(), entry.ndim
        spatial = label_map.ndim == ndim or (label_map.ndim == ndim + 1 and label_map.shape[0] == 1)
        _check(ndim in (2, 3) and spatial, f"case {entry.case_id}: a {label_map.shape} map with {ndim} spacing values",
               "a 2D or 3D map, optionally with one leading channel axis, and one spacing value per spatial axis")
        _check(np.issubdtype(label_map.dtype, np.integer),
               f"case {entry.case_id}: label map holds {label_map.dtype}", "integer labels")
        values = frozenset(int(v) for v in np.unique(label_map))
        unknown = sorted(values - set(self.vocabulary.values.values()))
        _check(not unknown, f"case {entry.case_id}: label values {unknown} are not in the label names",
               f"known labels: {self.vocabulary.listing()}")
        orientation = self._orientation_of(entry)
        _check(max(orientation.lr_axis, orientation.cc_axis) < ndim,
               f"case {entry.case_id}: {orientation} names an axis a {ndim}D map does not have")
        return values

    def _required_values(self, names: Sequence[str]) -> dict[str, int]:
        names = (names,) if isinstance(names, str) else tuple(names)
        unknown = [name for name in names if name not in self.vocabulary.values]
        _check(not unknown, f"unknown required label '{', '.join(unknown)}'",
               f"known labels: {self.vocabulary.listing()}")
        return {name: self.vocabulary.values[name] for name in names}


# ------------------------------------------------------------------------------------------- building


def _cached_entry(record: CaseRecord, cache_dir: Path, orientation: Orientation | None) -> BankEntry:
    path = cache_dir / f"{record.case_id}.safetensors"
    if not path.is_file():
        raise UserInputError(path, f"case {record.case_id} is not in the preprocessed cache",
                             "run `radsynth ingest CONFIG` with this config first")
    with safe_open(str(path), framework="numpy") as handle:
        affine = handle.get_tensor("affine")
    return BankEntry(record.case_id, path, spacing_of(affine), dict(record.attributes),
                     orientation or _cached_orientation(record, affine))


def _cached_orientation(record: CaseRecord, affine: np.ndarray) -> Orientation:
    if len(record.shape) == 2:
        return RADIOGRAPH_ORIENTATION  # a 2D raster's affine holds no patient directions
    return orientation_from_affine(affine)


def _matching(
    entries: Sequence[BankEntry],
    present: Sequence[frozenset[int]],
    where: AttributeFilter,
    required: Mapping[str, int],
) -> list[int]:
    """Indices of the entries whose attributes match ``where`` and whose maps hold every required label."""
    known = sorted({key for entry in entries for key in entry.attributes})
    unknown = sorted(set(where) - set(known))
    _check(not unknown, f"unknown attribute '{', '.join(unknown)}' in the filter",
           f"attributes of the training cases: {', '.join(known) or 'none'}")
    allowed = {key: _as_choices(value) for key, value in where.items()}
    chosen = [
        index for index, entry in enumerate(entries)
        if all(entry.attributes.get(key) in choices for key, choices in allowed.items())
        and set(required.values()) <= present[index]
    ]
    wanted = [f"{key}={'|'.join(map(str, choices))}" for key, choices in allowed.items()]
    wanted += [f"label {name}" for name in required]
    _check(bool(chosen), f"none of the {len(entries)} training cases has {' and '.join(wanted)}",
           "relax the filter, or ingest cases that have it")
    return chosen


def _as_choices(value: AttributeValue | Sequence[AttributeValue]) -> tuple[AttributeValue, ...]:
    if isinstance(value, (list, tuple, set, frozenset)):
        return tuple(value)
    return (value,)


def _mirrored_attributes(attributes: Mapping[str, AttributeValue]) -> dict[str, AttributeValue]:
    """Attributes after a left-right mirror: every "right" value becomes "left" and the other way round."""
    other = {"right": "left", "left": "right"}
    return {key: other.get(value.lower(), value) if isinstance(value, str) else value
            for key, value in attributes.items()}


# -------------------------------------------------------------------------------------- augmentations


class _LeftRightSwap:
    """Which label values trade places in a left-right mirror, and which forbid the mirror."""

    def __init__(self, vocabulary: LabelVocabulary):
        by_side = {(phrase_of(name), side_of(name)): (name, value) for name, value in vocabulary.values.items()}
        self.table = np.arange(max(vocabulary.values.values()) + 1)
        self.pairs: list[tuple[str, str, int, int]] = []  # (right name, left name, right value, left value)
        self.unpaired: set[int] = set()
        for (phrase, side), (name, value) in by_side.items():
            if side is None:
                continue
            counterpart = by_side.get((phrase, "left" if side == "right" else "right"))
            if counterpart is None:
                self.unpaired.add(value)
                continue
            self.table[value] = counterpart[1]
            if side == "right":
                self.pairs.append((name, counterpart[0], value, counterpart[1]))
        self.lateralised = {value for name, value in vocabulary.values.items()
                            if side_of(name) is None and LATERALISED_ORGAN_WORDS & set(phrase_of(name).split())}

    def blocked_by(self, present: frozenset[int], allow_lateralised: bool) -> set[int]:
        """The labels in a map that a mirror would put on the wrong side."""
        return present & (self.unpaired | (set() if allow_lateralised else self.lateralised))

    def swapped_pairs(self, present: frozenset[int]) -> list[str]:
        return [f"{right}<->{left}" for right, left, *values in self.pairs if present & set(values)]


@dataclass
class _Augmenter:
    """One draw's augmentations, applied in a fixed order to a copy of the source's spatial map."""

    label_map: np.ndarray
    present: frozenset[int]
    orientation: Orientation
    settings: BankAugmentation
    swap: _LeftRightSwap
    rng: np.random.Generator
    applied: list[dict] = field(default_factory=list)

    def run(self) -> tuple[np.ndarray, list[dict]]:
        self.flip_left_right()
        self.flip_cranio_caudal()
        scaled = self.scale()
        deformed = self.elastic()
        if (scaled or deformed) and self.settings.smooth_sigma > 0:
            self._keep("smooth_edges", {"sigma": self.settings.smooth_sigma},
                       smooth_label_edges(self.label_map, self.settings.smooth_sigma))
        return self.label_map, self.applied

    def _happens(self, probability: float) -> bool:
        return bool(self.rng.random() < probability)

    def _keep(self, name: str, params: dict, result: np.ndarray) -> bool:
        """Take an augmentation's result, and record it, unless it erased a label (a small lesion)."""
        if frozenset(int(v) for v in np.unique(result)) != self.present:
            return False
        self.label_map = result
        self.applied.append({"name": name, "params": params})
        return True

    def flip_left_right(self) -> None:
        if not self._happens(self.settings.lr_flip_probability):
            return
        if self.swap.blocked_by(self.present, self.settings.flip_lateralised_anatomy):
            return
        axis = self.orientation.lr_axis
        # Mirroring alone would put the right lung's voxels on the patient's left still labelled right_lung.
        mirrored = self.swap.table.astype(self.label_map.dtype)[np.flip(self.label_map, axis=axis)]
        self._keep("flip_left_right", {"axis": axis, "swapped": self.swap.swapped_pairs(self.present)}, mirrored)

    def flip_cranio_caudal(self) -> None:
        if self._happens(self.settings.cc_flip_probability):
            axis = self.orientation.cc_axis
            self._keep("flip_cranio_caudal", {"axis": axis}, np.flip(self.label_map, axis=axis).copy())

    def scale(self) -> bool:
        if not self._happens(self.settings.scale_probability):
            return False
        factor = float(self.rng.uniform(*self.settings.scale_range))
        centre = foreground_centre(self.label_map)
        return self._keep("scale", {"factor": factor, "centre": [float(c) for c in centre]},
                          scale_about(self.label_map, factor, centre))

    def elastic(self) -> bool:
        if not self._happens(self.settings.elastic_probability):
            return False
        # The field comes from its own recorded seed, so the provenance alone rebuilds it.
        seed = int(self.rng.integers(2**31))
        sigma, magnitude = self.settings.elastic_sigma, self.settings.elastic_magnitude
        deformed = elastic_deform(self.label_map, sigma, magnitude, np.random.default_rng(seed))
        return self._keep("elastic", {"sigma": sigma, "magnitude": magnitude, "field_seed": seed}, deformed)


# ------------------------------------------------------------------------ label-map transforms (2D / 3D)


def foreground_centre(label_map: np.ndarray) -> np.ndarray:
    """The centroid of the labelled (non-background) voxels, or the array's centre when there are none."""
    foreground = label_map != 0
    if not foreground.any():
        return (np.asarray(label_map.shape, dtype=float) - 1.0) / 2.0
    return np.asarray(ndimage.center_of_mass(foreground), dtype=float)


def scale_about(label_map: np.ndarray, factor: float, centre: Sequence[float]) -> np.ndarray:
    """Grow (factor > 1) or shrink the map about ``centre`` (voxel indices), nearest neighbour, same shape.

    Each output voxel x reads the input at centre + (x - centre) / factor. Edges extend the border voxels: what
    touches the field of view's edge was cut by it, so it goes on beyond.
    """
    centre = np.asarray(centre, dtype=float)
    return ndimage.affine_transform(label_map, np.full(label_map.ndim, 1.0 / factor), offset=centre - centre / factor,
                                    order=0, mode="nearest", output=label_map.dtype)


def elastic_deform(label_map: np.ndarray, sigma: float, magnitude: float, rng: np.random.Generator) -> np.ndarray:
    """Warp the map by a smooth random displacement field, nearest neighbour so labels stay labels."""
    grids = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in label_map.shape], indexing="ij")
    field = divergence_free_field(rng, label_map.shape, sigma, magnitude)
    return ndimage.map_coordinates(label_map, [grid + shift for grid, shift in zip(grids, field)], order=0,
                                   mode="nearest", output=label_map.dtype)


def divergence_free_field(
    rng: np.random.Generator, shape: Sequence[int], sigma: float, magnitude: float
) -> list[np.ndarray]:
    """A smooth displacement per axis, with features about ``sigma`` voxels across and an RMS of ``magnitude``
    voxels per axis, that neither compresses nor expands anywhere (to first order).

    It is the curl of smooth noise (``phantoms.shapes.smooth_noise``): a scalar potential in 2D, a vector one in
    3D. Plain smoothed noise per axis changed lung volumes by 20-50% at the same displacement on the phantoms;
    without divergence, organs change shape while sizes change only through the recorded ``scale`` step.
    """
    # Central differences along different axes commute, so the discrete divergence of this curl is exactly 0.
    def derivative(values: np.ndarray, axis: int) -> np.ndarray:
        return np.gradient(values, axis=axis)

    if len(shape) == 2:
        potential = smooth_noise(rng, shape, correlation=sigma)
        field = [derivative(potential, 1), -derivative(potential, 0)]
    else:
        a = [smooth_noise(rng, shape, correlation=sigma) for _ in range(3)]
        field = [derivative(a[2], 1) - derivative(a[1], 2), derivative(a[0], 2) - derivative(a[2], 0),
                 derivative(a[1], 0) - derivative(a[0], 1)]
    rms = math.sqrt(float(np.mean([np.mean(component**2) for component in field])))
    return [component * np.float32(magnitude / max(rms, 1e-12)) for component in field]


def smooth_label_edges(label_map: np.ndarray, sigma: float) -> np.ndarray:
    """Per-label Gaussian smoothing, then the strongest label per voxel: staircase edges become smooth.

    Only labels in the map compete, so no value appears that was not there; a label too small to win any voxel
    after smoothing (a one-voxel lesion) keeps its own voxels, so none disappears either.
    """
    values = np.unique(label_map)
    best_score = np.full(label_map.shape, -1.0, dtype=np.float32)
    smoothed = np.zeros_like(label_map)
    for value in values:
        score = ndimage.gaussian_filter((label_map == value).astype(np.float32), sigma, mode="nearest")
        wins = score > best_score  # strict: a tie keeps the lower label, the same way on every run
        smoothed[wins], best_score[wins] = value, score[wins]
    for value in np.setdiff1d(values, np.unique(smoothed)):
        smoothed[label_map == value] = value
    return smoothed

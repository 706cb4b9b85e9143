"""Lesion control on label maps: insert, remove, move or resize one lesion label inside its organ.

A mask-conditioned generator draws whatever the label map says, so controlling lesions means editing the map
before sampling. Everything works on 2D and 3D integer maps alike; "volume" is an area in mm^2 on a 2D map
(a radiograph) and a volume in ml on a 3D one.

Sizes are hit by construction: a lesion is the N voxels of its organ nearest to its centre in millimetres
(optionally with a smooth random bumpiness), N being the requested volume over the voxel volume, so the
achieved volume is within one voxel of the request on any grid. Growing through organ voxels only means a
lesion never leaves its organ and never overwrites another label.

Orientation: "right"/"left" are the patient's sides and "upper"/"middle"/"lower" the thirds of the organ's
cranio-caudal extent, so an edit needs to know which array axis runs which way (``Orientation``). The
defaults follow what the built-in phantoms draw:

- chest_xray (2D, frontal film in radiographic display): axis 0 (rows) runs superior -> inferior, axis 1
  (columns) runs from the patient's right (image left) to the patient's left.
- ct_torso, mri_torso and brain_mri (3D, RAS as their affine says): axis 0 runs from the patient's left (low
  index) to the right, axis 1 from posterior to anterior, axis 2 from inferior to superior (superior at high index).

For real NIfTI data, ``orientation_from_affine`` reads the same facts from the voxel-to-world (RAS) affine.

Request grammar (``parse_lesion_request``), case-insensitive, words in any order::

    [insert|add|remove|delete|move|resize] [right|left] [upper|middle|lower] [ORGAN] LESION [SIZE]
        [in [right|left] ORGAN [upper|middle|lower]]

SIZE is ``N`` or a range ``N-M`` / ``N to M`` with a unit: ``mm`` or ``cm`` (diameter), ``ml`` or ``cc``
(volume, 3D maps), ``mm2`` or ``cm2`` (area, 2D maps). LESION and ORGAN are label names with ``_`` read as
spaces and the side dropped (``right_lung`` answers to "right lung"); a lesion word alone names the one lesion
label ending in it ("tumour" is ``liver_tumour`` in the CT vocabulary); "lobe"/"lungs" read as "lung" and
"tumor" as "tumour". Without an organ, an insert goes to the lesion's usual host: the organ in its own name
(``liver_tumour`` -> ``liver``) or, failing that, ``TYPICAL_HOSTS``. Examples: "liver tumour 20-40 mm",
"right lower lobe nodule 8 mm", "remove nodule", "resize tumour to 15 ml", "nodule 8 mm in right lung upper".
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from nibabel.orientations import aff2axcodes
from scipy import ndimage

from radsynth.configs.errors import UserInputError
from radsynth.pipelines.data.phantoms.shapes import (
    equivalent_diameter_mm,
    interior_voxels,
    log_uniform,
    pick_voxel,
    smooth_noise,
)

WHERE = "lesions"
ACTIONS = ("insert", "remove", "move", "resize")
SIDES = ("right", "left")
LEVELS = ("upper", "middle", "lower")
# Size units a request may use: "mm" is a diameter, "ml" a 3D volume, "mm2" a 2D area.
SIZE_UNITS = ("mm", "ml", "mm2")

# Words that make a label a lesion rather than an organ, so "liver tumour" reads as a lesion in the liver.
LESION_WORDS = frozenset({"nodule", "tumour", "mass", "lesion", "cyst", "cancer", "metastasis", "consolidation"})
# Where a lesion usually grows when a request names no organ; the first one the vocabulary has wins.
TYPICAL_HOSTS = {
    "nodule": ("lung",),
    "consolidation": ("lung",),
    "tumour": ("brain", "liver"),
    "mass": ("brain", "liver", "lung"),
    "cyst": ("kidney", "liver"),
}
GRAMMAR = (
    "[insert|remove|move|resize] [right|left] [upper|middle|lower] [ORGAN] LESION [SIZE] "
    "[in [right|left] ORGAN [upper|middle|lower]], SIZE being N or N-M with mm or cm (diameter), "
    "ml or cc (3D volume), mm2 or cm2 (2D area)"
)

# Read only when the word is not itself part of a label name, so a vocabulary with a "lobe" label keeps it.
_SYNONYMS = {"tumor": "tumour", "lobe": "lung", "lobes": "lung", "lungs": "lung", "hepatic": "liver",
             "hemisphere": "brain"}
_ACTION_WORDS = {"insert": "insert", "add": "insert", "remove": "remove", "delete": "remove", "move": "move",
                 "resize": "resize"}
_FILLER_WORDS = frozenset({"a", "an", "the", "in", "into", "inside", "of", "to", "at", "from"})
# Unit as written -> (request unit, factor into it).
_UNITS = {"mm": ("mm", 1.0), "cm": ("mm", 10.0), "ml": ("ml", 1.0), "cc": ("ml", 1.0), "mm2": ("mm2", 1.0),
          "cm2": ("mm2", 100.0)}
_NUMBER = r"(\d+(?:\.\d+)?)"
_SIZE_PATTERN = re.compile(rf"(?<![\w.]){_NUMBER}(?:\s*(?:-|to)\s*{_NUMBER})?\s*(mm2|cm2|mm|cm|ml|cc)(?!\w)")


# ------------------------------------------------------------------------------------------ orientation


@dataclass(frozen=True)
class Orientation:
    """Which array axes run left-right and cranio-caudal, and which end of each is patient-right / superior."""

    lr_axis: int
    cc_axis: int
    right_is_low_index: bool
    superior_is_low_index: bool

    def __post_init__(self):
        if self.lr_axis == self.cc_axis:
            raise ValueError(f"left-right and cranio-caudal need different axes, both are {self.lr_axis}")


RADIOGRAPH_ORIENTATION = Orientation(lr_axis=1, cc_axis=0, right_is_low_index=True, superior_is_low_index=True)
RAS_VOLUME_ORIENTATION = Orientation(lr_axis=0, cc_axis=2, right_is_low_index=False, superior_is_low_index=False)


def default_orientation(ndim: int) -> Orientation:
    """The built-in phantoms' layout: a frontal film in radiographic display (2D), or ct_torso/brain_mri (3D)."""
    if ndim not in (2, 3):
        raise ValueError(f"lesion edits work on 2D or 3D label maps, got {ndim}D")
    return RADIOGRAPH_ORIENTATION if ndim == 2 else RAS_VOLUME_ORIENTATION


def orientation_from_affine(affine: np.ndarray) -> Orientation:
    """The orientation of a 3D array whose voxel-to-world affine maps into RAS+ millimetres (NIfTI).

    A 2D raster's (row, column) affine carries no patient directions: use ``RADIOGRAPH_ORIENTATION`` there.
    """
    codes = aff2axcodes(np.asarray(affine, dtype=float))  # the direction each array axis runs towards
    lr_axes = [axis for axis, code in enumerate(codes) if code in ("L", "R")]
    cc_axes = [axis for axis, code in enumerate(codes) if code in ("S", "I")]
    if not lr_axes or not cc_axes:
        raise ValueError(f"affine axes run towards {codes}: no left-right or cranio-caudal axis to edit along")
    lr_axis, cc_axis = lr_axes[0], cc_axes[0]
    # An axis running towards L starts at the patient's right; one running towards I starts superior.
    return Orientation(lr_axis, cc_axis, codes[lr_axis] == "L", codes[cc_axis] == "I")


# -------------------------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class LesionRequest:
    """One lesion edit, in label names (``parse_lesion_request`` writes one from a short text).

    - ``organs``: the labels the lesion must lie in (a name or a tuple, e.g. both lungs). For insert and move
      it is where the lesion goes (empty: the lesion's usual host, or for a move the organ it is in); for
      remove and resize it is the organ the lesion's voxels go back to (empty: the label most common around
      the lesion, which can mislead when a lesion fills most of its organ and touches more of its neighbours).
    - ``size``: a value or a ``(min, max)`` range, drawn log-uniformly with the edit's rng (small lesions are
      as common as large ones per doubling, as in the phantoms); ``size_unit`` "mm" (diameter), "ml" (3D
      volume) or "mm2" (2D area). Insert and resize need one; move keeps the lesion's voxel count.
    - ``side``: the patient's side: picks sided labels ("right_lung") by name, otherwise the half of the
      organ on that side of its centre of mass. ``level``: a third of the organ's cranio-caudal extent.
    - ``move_by_mm``: for move, the new centre as an offset from the lesion's centroid, in millimetres per
      array axis; without it a new centre is drawn like an insert's, away from the old one.
    - ``component``: which connected lesion to edit, 1 being the largest; None edits all of them (remove)
      or the only one (move and resize refuse a choice among several).
    - ``irregularity``: 0 grows a ball; up to < 1 pushes its surface in and out by that fraction, smoothly.
    """

    action: str
    lesion: str
    organs: tuple[str, ...] = ()
    size: float | tuple[float, float] | None = None
    size_unit: str = "mm"
    side: str | None = None
    level: str | None = None
    move_by_mm: tuple[float, ...] | None = None
    component: int | None = None
    irregularity: float = 0.0

    def __post_init__(self):
        if isinstance(self.organs, str):
            object.__setattr__(self, "organs", (self.organs,))
        if isinstance(self.size, Sequence):
            object.__setattr__(self, "size", tuple(float(value) for value in self.size))
        _check(self.action in ACTIONS, f"unknown action '{self.action}'", f"allowed: {', '.join(ACTIONS)}")
        _check(self.side in (None, *SIDES), f"unknown side '{self.side}'", f"allowed: {', '.join(SIDES)}")
        _check(self.level in (None, *LEVELS), f"unknown level '{self.level}'", f"allowed: {', '.join(LEVELS)}")
        _check(self.size_unit in SIZE_UNITS, f"unknown size unit '{self.size_unit}'",
               "allowed: mm (diameter), ml (3D volume), mm2 (2D area)")
        self._check_size()
        _check(self.move_by_mm is None or self.action == "move", f"move_by_mm given to {self.action}",
               "only move takes an offset")
        _check(self.component is None or self.component >= 1, f"component {self.component}", "1 is the largest")
        _check(0.0 <= self.irregularity < 1.0, f"irregularity {self.irregularity}", "allowed: 0 <= irregularity < 1")

    def _check_size(self) -> None:
        needs_size = self.action in ("insert", "resize")
        if self.size is None:
            _check(not needs_size, f"{self.action} needs a size", "give a diameter (mm), volume (ml) or area (mm2)")
            return
        _check(needs_size, f"{self.action} takes no size", "move keeps the lesion's size; remove has none")
        values = self.size if isinstance(self.size, tuple) else (self.size,)
        _check(len(values) in (1, 2) and all(value > 0 for value in values), f"size {self.size}",
               "a positive value or a (min, max) pair")
        _check(values[0] <= values[-1], f"size range {values[0]:g}-{values[-1]:g} runs backwards", "write min-max")


def _check(condition: bool, problem: str, allowed: str | None = None) -> None:
    if not condition:
        raise UserInputError(WHERE, problem, allowed)


class LabelVocabulary:
    """Label names and values, and the phrases they answer to: ``right_lung`` is "lung", on the right."""

    def __init__(self, label_names: Mapping[int | str, str]):
        # Manifests read from JSON carry the values as strings.
        self.values = {str(name): int(value) for value, name in label_names.items()}
        self.phrases: dict[str, list[str]] = {}
        for name in self.values:
            self.phrases.setdefault(phrase_of(name), []).append(name)
        self.words = {word for phrase in self.phrases for word in phrase.split()}

    def listing(self) -> str:
        return ", ".join(name for name, value in self.values.items() if value != 0)

    def value_of(self, name: str, role: str) -> int:
        _check(name in self.values, f"unknown {role} label '{name}'", f"known labels: {self.listing()}")
        return self.values[name]

    def name_of(self, value: int) -> str:
        return next((name for name, known in self.values.items() if known == value), str(value))

    def labels_of(self, phrase: str, side: str | None) -> tuple[str, ...]:
        """The labels a phrase names, narrowed to one side where the vocabulary has sided labels."""
        names = self.phrases[phrase]
        if side is None or not any(side_of(name) for name in names):
            return tuple(names)
        chosen = tuple(name for name in names if side_of(name) in (None, side))
        _check(bool(chosen), f"no {side} {phrase} among the labels", f"known labels: {self.listing()}")
        return chosen

    def typical_host(self, lesion: str, side: str | None) -> tuple[str, ...]:
        """The organ named in the lesion's own label (``liver_tumour``), else its usual host in TYPICAL_HOSTS."""
        words = phrase_of(lesion).split()
        candidates = [" ".join(words[:-1])] if len(words) > 1 else []
        candidates += TYPICAL_HOSTS.get(_canonical(words[-1]), ())
        for phrase in candidates:
            if phrase in self.phrases:
                return self.labels_of(phrase, side)
        hosts = ", ".join(candidates) or "none known"
        raise UserInputError(WHERE, f"no organ given for '{lesion}' and no usual host of it ({hosts}) is a label",
                             f"name the organ, one of: {self.listing()}")

    def read_phrases(self, words: Sequence[str]) -> list[str]:
        """Split words into label phrases, longest first ("liver tumour" before "liver")."""
        phrases, start = [], 0
        while start < len(words):
            for end in range(len(words), start, -1):
                phrase = " ".join(words[start:end])
                if phrase in self.phrases:
                    break
            else:
                phrase, end = self._lesion_ending_in(words[start]), start + 1
            phrases.append(phrase)
            start = end
        return phrases

    def _lesion_ending_in(self, word: str) -> str:
        """A lesion word alone names the one lesion label that ends in it ("nodule" -> ``lung_nodule``)."""
        matches = [phrase for phrase in self.phrases if is_lesion_phrase(phrase) and phrase.split()[-1] == word]
        _check(len(matches) < 2, f"'{word}' could be any of {', '.join(matches)}", "name one of them in full")
        _check(bool(matches), f"'{word}' is not a label, action, side, level or size (a size needs a unit)")
        return matches[0]


def side_of(name: str) -> str | None:
    return _split_side(name)[0]


def phrase_of(name: str) -> str:
    """A label name as the words a request uses for it, without its side: ``right_lung`` -> "lung"."""
    return " ".join(_split_side(name)[1])


def _split_side(name: str) -> tuple[str | None, list[str]]:
    words = [word for word in re.split(r"[\s_-]+", name.strip().lower()) if word]
    if len(words) > 1 and words[0] in SIDES:
        return words[0], words[1:]
    if len(words) > 1 and words[-1] in SIDES:  # TotalSegmentator style: kidney_left
        return words[-1], words[:-1]
    return None, words


def _canonical(word: str) -> str:
    return _SYNONYMS.get(word, word)


def is_lesion_phrase(phrase: str) -> bool:
    return _canonical(phrase.split()[-1]) in LESION_WORDS


def parse_lesion_request(text: str, label_names: Mapping[int | str, str]) -> LesionRequest:
    """Read a short request such as "right lower lobe nodule 8 mm" against a label vocabulary (grammar above)."""
    vocabulary = LabelVocabulary(label_names)
    try:
        return _parse(str(text), vocabulary)
    except UserInputError as error:
        raise UserInputError(WHERE, f"cannot read '{text}': {error.problem}",
                             f"write {GRAMMAR}; known labels: {vocabulary.listing()}") from None


def _parse(text: str, vocabulary: LabelVocabulary) -> LesionRequest:
    lowered = re.sub(r"(mm|cm)(\^2|²)", r"\g<1>2", text.lower())
    sizes = list(_SIZE_PATTERN.finditer(lowered))
    _check(len(sizes) < 2, "more than one size")
    size, unit = _read_size(sizes[0]) if sizes else (None, "mm")
    words = re.findall(r"[^\s,;]+", _SIZE_PATTERN.sub(" ", lowered).replace("_", " "))
    action = _ACTION_WORDS[words.pop(0)] if words and words[0] in _ACTION_WORDS else "insert"
    side, level = _only_one(words, SIDES, "side"), _only_one(words, LEVELS, "level")
    content = [word if word in vocabulary.words else _canonical(word) for word in words
               if word not in (*SIDES, *LEVELS, *_FILLER_WORDS)]
    phrases = vocabulary.read_phrases(content)
    lesions = sorted({phrase for phrase in phrases if is_lesion_phrase(phrase)})
    organs = sorted({phrase for phrase in phrases if not is_lesion_phrase(phrase)})
    _check(len(lesions) == 1, f"names {len(lesions)} lesions ({', '.join(lesions) or 'none'})", "name one lesion")
    _check(len(organs) < 2, f"names {len(organs)} organs ({', '.join(organs)})", "name at most one organ")
    lesion_names = vocabulary.labels_of(lesions[0], side)
    _check(len(lesion_names) == 1, f"'{lesions[0]}' is several labels ({', '.join(lesion_names)})", "give a side")
    lesion = lesion_names[0]
    if organs:
        hosts = vocabulary.labels_of(organs[0], side)
    else:  # only an insert needs an organ up front; move and resize keep the one the lesion is in
        hosts = vocabulary.typical_host(lesion, side) if action == "insert" else ()
    return LesionRequest(action, lesion, hosts, size, unit, side, level)


def _read_size(match: re.Match) -> tuple[float | tuple[float, float], str]:
    unit, factor = _UNITS[match.group(3)]
    low = float(match.group(1)) * factor
    if match.group(2) is None:
        return low, unit
    return (low, float(match.group(2)) * factor), unit


def _only_one(words: Iterable[str], choices: Sequence[str], what: str) -> str | None:
    found = sorted({word for word in words if word in choices})
    _check(len(found) < 2, f"names more than one {what} ({', '.join(found)})")
    return found[0] if found else None


# --------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class LesionEditRecord:
    """What an edit did, for a sample's JSON sidecar. Volumes are in ``volume_unit``: ml (3D) or mm2 (2D).

    The lesion described is the one written (insert, move, resize) or taken out (remove). ``centre_mm`` is
    ``centre_voxel`` times the spacing: millimetres from voxel 0 along the array axes, not world coordinates.
    ``drawn_size`` is the value drawn from a size range, in the request's ``size_unit``.
    """

    action: str
    lesion_label: str
    organ_labels: tuple[str, ...]
    volume_unit: str
    requested_volume: float | None
    requested_diameter_mm: float | None
    drawn_size: float | None
    achieved_volume: float
    achieved_diameter_mm: float
    voxel_count: int
    centre_voxel: tuple[int, ...]
    centre_mm: tuple[float, ...]
    previous_centre_voxel: tuple[int, ...] | None = None

    def to_dict(self) -> dict:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}


def ball_measure(diameter_mm: float, ndim: int) -> float:
    """Area (2D, mm^2) or volume (3D, mm^3) of a disc or ball of that diameter."""
    return math.pi / 4.0 * diameter_mm**2 if ndim == 2 else math.pi / 6.0 * diameter_mm**3


def ball_diameter(measure: float, ndim: int) -> float:
    """The diameter of the disc (2D) or ball (3D) with that area or volume (mm^2 or mm^3)."""
    return math.sqrt(4.0 * measure / math.pi) if ndim == 2 else (6.0 * measure / math.pi) ** (1.0 / 3.0)


# ----------------------------------------------------------------------------------------------- edits


def apply_lesion_edit(
    label_map: np.ndarray,
    spacing_mm: Sequence[float],
    request: LesionRequest,
    label_names: Mapping[int | str, str],
    rng: np.random.Generator,
    orientation: Orientation | None = None,
) -> tuple[np.ndarray, LesionEditRecord]:
    """Apply one lesion edit to a copy of ``label_map``; the caller's array is left as it was.

    ``orientation`` defaults to the built-in phantoms' layout for the map's dimensionality (module docstring).
    """
    label_map = np.asarray(label_map)
    if not np.issubdtype(label_map.dtype, np.integer):
        raise ValueError(f"a label map holds integers, got {label_map.dtype}")
    spacing = np.asarray(spacing_mm, dtype=float)
    if spacing.shape != (label_map.ndim,) or np.any(spacing <= 0):
        raise ValueError(f"spacing {tuple(spacing_mm)} does not fit a {label_map.ndim}D map")
    orientation = orientation or default_orientation(label_map.ndim)
    if max(orientation.lr_axis, orientation.cc_axis) >= label_map.ndim:
        raise ValueError(f"{orientation} names an axis a {label_map.ndim}D map does not have")
    editor = _LesionEditor(label_map.copy(), spacing, orientation, request, LabelVocabulary(label_names), rng)
    record = getattr(editor, request.action)()
    return editor.label_map, record


@dataclass(frozen=True)
class _Organ:
    """The labels a lesion may go in; ``halved`` when the side is a half of them rather than a sided label."""

    names: tuple[str, ...]
    values: tuple[int, ...]
    halved: bool


@dataclass
class _LesionEditor:
    """One edit's state: the label map being edited in place (a copy), its grid and the request."""

    label_map: np.ndarray
    spacing: np.ndarray
    orientation: Orientation
    request: LesionRequest
    vocabulary: LabelVocabulary
    rng: np.random.Generator

    def __post_init__(self):
        self.lesion_value = self.vocabulary.value_of(self.request.lesion, "lesion")
        self.voxel_measure = float(np.prod(self.spacing))

    # ------------------------------------------------------------------------------------- the four edits

    def insert(self) -> LesionEditRecord:
        organ = self._organ(self.request.organs or self.vocabulary.typical_host(self.request.lesion, self.request.side))
        measure, drawn = self._requested_measure()
        count = self._voxel_count(measure)
        centre, component = self._choose_centre(organ, count)
        host = self._name_at(centre)
        lesion = self._grow(component, centre, count)
        return self._record(lesion, (host,), centre, measure, drawn)

    def remove(self) -> LesionEditRecord:
        selection = self._selected_lesion(single=False)
        hosts = self._refill(selection, self.request.organs)
        return self._record(selection, tuple(dict.fromkeys(hosts)), _centroid_voxel(selection))

    def move(self) -> LesionEditRecord:
        selection = self._selected_lesion(single=True)
        count, previous = int(selection.sum()), _centroid(selection)
        old_host = self._refill(selection, ())[0]  # the organs of a move are where it goes, not where it was
        side = self.request.side
        # Without an organ, the lesion stays in the kind of organ it is in, switching to its other side if asked.
        names = self.request.organs or (
            (old_host,) if side is None else self.vocabulary.labels_of(phrase_of(old_host), side))
        organ = self._organ(names)
        if self.request.move_by_mm is None:
            centre, component = self._choose_centre(organ, count, avoid=previous)
        else:
            centre = self._offset_centre(previous, organ)
            component = self._component_at(centre, count)
        host = self._name_at(centre)
        lesion = self._grow(component, centre, count)
        return self._record(lesion, (host,), centre, previous=_rounded(previous))

    def resize(self) -> LesionEditRecord:
        selection = self._selected_lesion(single=True)
        previous = _centroid(selection)
        host = self._refill(selection, self.request.organs)[0]
        measure, drawn = self._requested_measure()
        count = self._voxel_count(measure)
        centre = self._nearest_voxel(self.label_map == self.vocabulary.values[host], previous)
        lesion = self._grow(self._component_at(centre, count), centre, count)
        return self._record(lesion, (host,), centre, measure, drawn, previous=_rounded(previous))

    # ------------------------------------------------------------------------------------------- sizes

    @property
    def _unit(self) -> str:
        return "mm2" if self.label_map.ndim == 2 else "ml"

    def _in_unit(self, measure: float) -> float:
        """mm^2 stays mm^2; mm^3 becomes ml."""
        return measure if self.label_map.ndim == 2 else measure / 1000.0

    def _requested_measure(self) -> tuple[float, float | None]:
        """The requested area or volume in mm^2 / mm^3, and the value drawn from a range (None for a value)."""
        size, unit, ndim = self.request.size, self.request.size_unit, self.label_map.ndim
        drawn = log_uniform(self.rng, *size) if isinstance(size, tuple) else None
        value = drawn if drawn is not None else float(size)
        _check(unit != "ml" or ndim == 3, f"{value:g} ml is a volume and this label map is 2D",
               "give an area (mm2) or a diameter (mm)")
        _check(unit != "mm2" or ndim == 2, f"{value:g} mm2 is an area and this label map is 3D",
               "give a volume (ml) or a diameter (mm)")
        measure = {"mm": ball_measure(value, ndim), "ml": value * 1000.0, "mm2": value}[unit]
        return measure, drawn

    def _voxel_count(self, measure: float) -> int:
        return max(1, round(measure / self.voxel_measure))

    def _too_large(self, count: int, available: int, organ: str) -> UserInputError:
        return UserInputError(
            WHERE, f"a {self.request.lesion} of {self._in_unit(count * self.voxel_measure):.4g} {self._unit} does not "
            f"fit in {organ} ({self._in_unit(available * self.voxel_measure):.4g} {self._unit})",
            "ask for a smaller lesion or another organ")

    # ------------------------------------------------------------------------------------------ organs

    def _organ(self, names: Sequence[str]) -> _Organ:
        """The named organ labels that are on the requested side and present in this map."""
        for name in names:
            self.vocabulary.value_of(name, "organ")
        side = self.request.side
        sided = side is not None and any(side_of(name) for name in names)
        on_side = [name for name in names if not sided or side_of(name) in (None, side)]
        _check(bool(on_side), f"organ {', '.join(names)} is not on the {side} side", "drop the side or the organ")
        present = set(np.unique(self.label_map).tolist())
        kept = tuple(name for name in on_side if self.vocabulary.values[name] in present)
        _check(bool(kept), f"organ {', '.join(on_side)} is not in this mask",
               f"labels present: {', '.join(self.vocabulary.name_of(v) for v in sorted(present) if v != 0)}")
        return _Organ(kept, tuple(self.vocabulary.values[name] for name in kept), halved=side is not None and not sided)

    def _name_at(self, voxel: tuple[int, ...]) -> str:
        return self.vocabulary.name_of(int(self.label_map[voxel]))

    def _choose_centre(
        self, organ: _Organ, count: int, avoid: np.ndarray | None = None
    ) -> tuple[tuple[int, ...], np.ndarray]:
        """A centre on the requested side and level, deep enough for the lesion, and its organ component."""
        components, sizes = _components(self.label_map, organ.values)
        if sizes.max() < count:
            raise self._too_large(count, int(sizes.max()), ", ".join(organ.names))
        in_organ = components > 0
        region = (sizes[components] >= count) & self._side_band(in_organ, organ) & self._level_band(in_organ)
        part = " ".join(word for word in (self.request.side, self.request.level) if word)
        _check(bool(region.any()), f"no room for a {count}-voxel {self.request.lesion} in the {part} part of "
               f"{', '.join(organ.names)}",
               "ask for a smaller lesion or drop the side or level")
        radius_mm = ball_diameter(count * self.voxel_measure, self.label_map.ndim) / 2.0
        # Deep centres keep the lesion a ball instead of a shape squeezed against the organ's (or level's) edge.
        candidates = interior_voxels(region, self.spacing, radius_mm)
        if avoid is not None:  # a move should land somewhere new, not on top of the old lesion
            far = candidates & (_distance_mm(self.label_map.shape, avoid, self.spacing) >= 2.0 * radius_mm)
            candidates = far if far.any() else candidates
        centre = pick_voxel(self.rng, candidates)
        return centre, components == components[centre]

    def _side_band(self, organ_mask: np.ndarray, organ: _Organ) -> np.ndarray | bool:
        """The half of an unsided organ on the requested side of its centre of mass."""
        if not organ.halved:
            return True
        axis, ndim = self.orientation.lr_axis, organ_mask.ndim
        index = np.arange(organ_mask.shape[axis])
        profile = organ_mask.sum(axis=tuple(a for a in range(ndim) if a != axis))
        middle = float((profile * index).sum() / profile.sum())
        right = index < middle if self.orientation.right_is_low_index else index > middle
        return _along(right if self.request.side == "right" else ~right, axis, ndim)

    def _level_band(self, organ_mask: np.ndarray) -> np.ndarray | bool:
        """The upper, middle or lower third of the organ's cranio-caudal extent."""
        if self.request.level is None:
            return True
        axis, ndim = self.orientation.cc_axis, organ_mask.ndim
        rows = np.flatnonzero(organ_mask.any(axis=tuple(a for a in range(ndim) if a != axis)))
        first, last = int(rows.min()), int(rows.max())
        index = np.arange(organ_mask.shape[axis])
        from_top = index - first if self.orientation.superior_is_low_index else last - index
        fraction = (from_top + 0.5) / (last - first + 1)
        third = LEVELS.index(self.request.level)
        return _along((fraction >= third / 3) & (fraction < (third + 1) / 3), axis, ndim)

    def _component_at(self, centre: tuple[int, ...], count: int) -> np.ndarray:
        """The connected part of the organ label at ``centre``; it must hold ``count`` voxels."""
        components, sizes = _components(self.label_map, (int(self.label_map[centre]),))
        size = int(sizes[components[centre]])
        if size < count:
            raise self._too_large(count, size, self._name_at(centre))
        return components == components[centre]

    def _offset_centre(self, previous: np.ndarray, organ: _Organ) -> tuple[int, ...]:
        offset = np.asarray(self.request.move_by_mm, dtype=float)
        _check(offset.shape == self.spacing.shape, f"move_by_mm {tuple(offset)} has {offset.size} values",
               f"one per array axis ({self.spacing.size})")
        target = np.round(previous + offset / self.spacing).astype(int)
        inside = bool(np.all((target >= 0) & (target < self.label_map.shape)))
        centre = tuple(int(i) for i in target)
        _check(inside and int(self.label_map[centre]) in organ.values,
               f"moving by {tuple(offset)} mm lands at voxel {centre}, outside {', '.join(organ.names)}",
               "choose an offset that stays inside the organ")
        return centre

    def _nearest_voxel(self, mask: np.ndarray, point: np.ndarray) -> tuple[int, ...]:
        distance = np.where(mask, _distance_mm(mask.shape, point, self.spacing), np.inf)
        return tuple(int(i) for i in np.unravel_index(int(np.argmin(distance)), mask.shape))

    # ----------------------------------------------------------------------------------------- lesions

    def _grow(self, component: np.ndarray, centre: tuple[int, ...], count: int) -> np.ndarray:
        """Label the ``count`` voxels of ``component`` nearest to ``centre`` (in mm) as the lesion."""
        box = ndimage.find_objects(component.astype(np.uint8))[0]
        coordinates = np.nonzero(component[box])
        start = np.array([s.start for s in box])
        distance = np.sqrt(sum(((coordinates[axis] + start[axis] - centre[axis]) * self.spacing[axis]) ** 2
                               for axis in range(component.ndim)))
        if self.request.irregularity > 0:
            radius_voxels = ball_diameter(count * self.voxel_measure, component.ndim) / 2.0 / self.spacing.mean()
            noise = smooth_noise(self.rng, component[box].shape, correlation=max(2.0, 0.7 * radius_voxels))
            # Dividing the distance by a smooth bump field moves the surface out where the field is high.
            distance = distance / (1.0 + self.request.irregularity * np.tanh(noise[coordinates]))
        nearest = np.argsort(distance, kind="stable")[:count]
        lesion = np.zeros(component.shape, bool)
        lesion[tuple(axis[nearest] + first for axis, first in zip(coordinates, start))] = True
        self.label_map[lesion] = self.lesion_value
        return lesion

    def _selected_lesion(self, single: bool) -> np.ndarray:
        """The lesion voxels the request edits: one connected lesion, or all of them."""
        action, name = self.request.action, self.request.lesion
        lesion = self.label_map == self.lesion_value
        _check(bool(lesion.any()), f"no '{name}' voxels in this mask to {action}", "insert one first")
        components, n = ndimage.label(lesion)
        choose = f"set component to 1..{n} (1 = largest)"
        if self.request.component is None:
            _check(not single or n == 1, f"the mask has {n} separate '{name}' lesions and {action} edits one", choose)
            return lesion
        _check(self.request.component <= n, f"component {self.request.component} of {n} '{name}' lesions", choose)
        by_size = np.argsort(-np.bincount(components.ravel())[1:], kind="stable")
        return components == by_size[self.request.component - 1] + 1

    def _refill(self, selection: np.ndarray, organs: Sequence[str]) -> list[str]:
        """Give each connected part of ``selection`` the label most common around it (other lesions aside),
        among ``organs`` where any of them touches it."""
        allowed = [self.vocabulary.value_of(name, "organ") for name in organs]
        lesion = self.label_map == self.lesion_value
        components, _ = ndimage.label(selection)
        hosts = []
        for index, box in enumerate(ndimage.find_objects(components), start=1):
            box = _grown_box(box, selection.shape)
            part = components[box] == index
            shell = ndimage.binary_dilation(part) & ~lesion[box]
            host = _surrounding_label(self.label_map[box][shell], allowed)
            self.label_map[box][part] = host
            hosts.append(self.vocabulary.name_of(host))
        return hosts

    def _record(
        self,
        lesion: np.ndarray,
        organs: tuple[str, ...],
        centre: tuple[int, ...],
        requested: float | None = None,
        drawn: float | None = None,
        previous: tuple[int, ...] | None = None,
    ) -> LesionEditRecord:
        count, ndim = int(lesion.sum()), lesion.ndim
        return LesionEditRecord(
            action=self.request.action,
            lesion_label=self.request.lesion,
            organ_labels=organs,
            volume_unit=self._unit,
            requested_volume=None if requested is None else self._in_unit(requested),
            requested_diameter_mm=None if requested is None else ball_diameter(requested, ndim),
            drawn_size=drawn,
            achieved_volume=self._in_unit(count * self.voxel_measure),
            achieved_diameter_mm=equivalent_diameter_mm(lesion, self.spacing),
            voxel_count=count,
            centre_voxel=tuple(int(i) for i in centre),
            centre_mm=tuple(float(i * s) for i, s in zip(centre, self.spacing)),
            previous_centre_voxel=previous,
        )


def _components(label_map: np.ndarray, values: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Connected parts of each label separately (touching labels stay apart), and their voxel counts.

    Returns an id per voxel (0 outside) and ``sizes[id]`` (0 for id 0), so ``sizes[ids]`` maps voxels to sizes.
    """
    ids = np.zeros(label_map.shape, np.int32)
    offset = 0
    for value in values:
        labelled, n = ndimage.label(label_map == value)
        ids[labelled > 0] = labelled[labelled > 0] + offset
        offset += n
    sizes = np.bincount(ids.ravel(), minlength=offset + 1)
    sizes[0] = 0
    return ids, sizes


def _surrounding_label(values: np.ndarray, allowed: Sequence[int]) -> int:
    """The most common label among a lesion's neighbours, preferring ``allowed`` labels where one touches it,
    and background (0) only when nothing else does: a lesion at its organ's edge can touch more background."""
    counts = np.bincount(values.ravel(), minlength=max([1, *[value + 1 for value in allowed]]))
    if any(counts[value] for value in allowed):
        counts[[value for value in range(counts.size) if value not in allowed]] = 0
    if counts[1:].any():
        counts[0] = 0
    return int(counts.argmax())


def _centroid(mask: np.ndarray) -> np.ndarray:
    return np.array([axis.mean() for axis in np.nonzero(mask)])


def _rounded(point: np.ndarray) -> tuple[int, ...]:
    return tuple(int(round(float(c))) for c in point)


def _centroid_voxel(mask: np.ndarray) -> tuple[int, ...]:
    return _rounded(_centroid(mask))


def _distance_mm(shape: Sequence[int], point: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Distance of every voxel from ``point`` (fractional index), in millimetres."""
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    return np.sqrt(sum(((grid - p) * s) ** 2 for grid, p, s in zip(grids, point, spacing)))


def _along(values: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """A per-index array along one axis, shaped to broadcast over the whole map."""
    return values.reshape([-1 if a == axis else 1 for a in range(ndim)])


def _grown_box(box: tuple[slice, ...], shape: Sequence[int], margin: int = 1) -> tuple[slice, ...]:
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, shape))

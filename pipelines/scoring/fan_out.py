"""The synthetic side's per-sample work, batch by batch, on whichever map the caller hands the scorer.

Embedding every sample in every feature space and finding its nearest training image in pixels grow with the
number of samples; everything else scoring does works on those results or on the (cached) real side. ``score``
runs this work through a ``BatchMap``: in this process by default, or on the build's task runner (threads, Dask,
Ray: ``flows.tasks``), where each batch is a task. A batch's result does not depend on where it ran, so the
scorecard is the same either way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import fields
from functools import partial
from typing import Any, TypeVar

import numpy as np

from .image_sets import ImageSet

T = TypeVar("T")
BatchMap = Callable[[Callable[[Any], T], Sequence[Any]], list[T]]


def in_process(work: Callable[[Any], T], items: Sequence[Any]) -> list[T]:
    return [work(item) for item in items]


def _batches(image_set: ImageSet, batch_size: int, with_masks: bool) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """(images, masks) of each batch as plain arrays (a spilled set is read here, one batch at a time)."""
    masks = image_set.masks if with_masks else None
    return [(np.asarray(image_set.images[start:start + batch_size]),
             None if masks is None else np.asarray(masks[start:start + batch_size]))
            for start in range(0, len(image_set), batch_size)]


def _extract(extractor, batch: tuple[np.ndarray, np.ndarray | None]) -> np.ndarray:
    return extractor.extract(*batch)


def embed(extractor, image_set: ImageSet, with_masks: bool, map_batches: BatchMap, batch_size: int) -> np.ndarray:
    """``extractor.extract`` of every image of ``image_set``, batch by batch."""
    return np.concatenate(map_batches(partial(_extract, extractor), _batches(image_set, batch_size, with_masks)))


def _pixel_matches(train: np.ndarray, settings: dict, batch: tuple[np.ndarray, np.ndarray | None]):
    from .privacy import pixel_nearest_neighbours

    return pixel_nearest_neighbours(batch[0], train, **settings)


def pixel_matches(image_set: ImageSet, train: np.ndarray, settings: dict, map_batches: BatchMap, batch_size: int):
    """``privacy.pixel_nearest_neighbours`` of every image of ``image_set`` against ``train``, batch by batch."""
    from .privacy import PixelMatches

    parts = map_batches(partial(_pixel_matches, np.asarray(train), settings), _batches(image_set, batch_size, False))
    joined = {f.name: np.concatenate([getattr(part, f.name) for part in parts]) for f in fields(PixelMatches)
              if f.name != "comparison_shape"}
    return PixelMatches(**joined, comparison_shape=parts[0].comparison_shape)

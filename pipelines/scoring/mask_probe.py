"""Mask adherence while a ControlNet trains: does a segmenter trained on real images find what the map drew?

The probe trains a segmenter once on the real training images and their maps, measures it on real held-out
cases (its ceiling: what a perfect generator could score), and at each validation conditions one image on
each held-out map, segments it and reports per-label Dice against the map. The ratio to the ceiling is the
number the release gate reads (``mask_dice_ratio_min``), so training shows early whether a run will pass.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .segmenter import Segmenter, per_label_dice

__all__ = ["MaskAdherenceProbe"]


class MaskAdherenceProbe:
    """Per-label Dice of generated images against their conditioning maps, next to the real ceiling.

    images, label_maps: real held-out cases (N, *spatial), images in [-1, 1], maps integer.
    prompts: one per case, the text the images are generated with.
    """

    def __init__(self, segmenter: Segmenter, images: np.ndarray, label_maps: np.ndarray, prompts: Sequence[str],
                 label_names: Mapping[int, str], seed: int = 0, num_inference_steps: int = 50,
                 guidance_scale: float = 3.0, guidance_interval: tuple[float, float] | None = None,
                 batch_size: int = 8):
        if not len(images) == len(label_maps) == len(prompts) > 0:
            raise ValueError(f"need as many images, maps and prompts (> 0), got {len(images)}, {len(label_maps)}, "
                             f"{len(prompts)}")
        self.segmenter, self.label_maps, self.prompts = segmenter, np.asarray(label_maps), list(prompts)
        self.labels = sorted(value for value in label_names if value != 0)
        self.names = [label_names[value] for value in self.labels]
        self.seed, self.steps, self.guidance, self.batch_size = seed, num_inference_steps, guidance_scale, batch_size
        self.guidance_interval = guidance_interval
        self.ceiling = self._per_label(np.asarray(images))

    @classmethod
    def fit(cls, train_images: np.ndarray, train_maps: np.ndarray, images: np.ndarray, label_maps: np.ndarray,
            prompts: Sequence[str], label_names: Mapping[int, str], segmenter_steps: int = 300, seed: int = 0,
            **sampling) -> MaskAdherenceProbe:
        """Train the segmenter on the real training set, then build the probe on the held-out cases."""
        train_images = np.asarray(train_images)
        segmenter = Segmenter(train_images.ndim - 1, max(label_names) + 1, seed=seed)
        segmenter.fit(train_images, train_maps, steps=segmenter_steps)
        return cls(segmenter, images, label_maps, prompts, label_names, seed=seed, **sampling)

    def _per_label(self, images: np.ndarray) -> np.ndarray:
        dice = per_label_dice(self.segmenter.predict(images), self.label_maps, self.labels)
        with warnings.catch_warnings():  # a label absent from every map is NaN, which says so
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(dice, axis=0)

    @torch.no_grad()
    def __call__(self, pipeline) -> dict[str, float]:
        """Generate an image per held-out map with ``pipeline`` (a mask-to-image pipeline) and score it.

        Returns ``dice/<label>`` and ``dice_real/<label>`` per label, and their means and ratio.
        """
        images = []
        for start in range(0, len(self.prompts), self.batch_size):
            rows = range(start, min(start + self.batch_size, len(self.prompts)))
            generators = [torch.Generator().manual_seed(self.seed + i) for i in rows]
            output = pipeline([self.prompts[i] for i in rows], self.label_maps[rows.start:rows.stop, None],
                              num_inference_steps=self.steps, guidance_scale=self.guidance,
                              guidance_interval=self.guidance_interval, generator=generators, output_type="np")
            images.append(np.asarray(output.images)[:, 0])
        generated = self._per_label(np.concatenate(images))
        logs = {f"dice/{name}": float(value) for name, value in zip(self.names, generated)}
        logs.update({f"dice_real/{name}": float(value) for name, value in zip(self.names, self.ceiling)})
        scored = ~np.isnan(generated) & ~np.isnan(self.ceiling)
        mean, ceiling = float(np.mean(generated[scored])), float(np.mean(self.ceiling[scored]))
        logs.update({"dice_mean": mean, "dice_real_mean": ceiling,
                     "dice_ratio_mean": mean / ceiling if ceiling > 0 else float("nan")})
        return logs


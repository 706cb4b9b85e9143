"""Training data for the generators: preprocessed cases from the cache, and latents encoded once.

Batches are chosen by ``batch_indices(step)``: a pure function of (seed, step), so training can be killed
and resumed at any checkpoint and see exactly the batches it would have seen. Images are read lazily from
the cache (3D datasets do not fit in memory); latents, 4^D times smaller, are kept in memory.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from radsynth.configs.errors import UserInputError
from radsynth.pipelines.data.io import spacing_of
from radsynth.pipelines.data.manifest import CaseRecord

from .prompts import render_prompt


def batch_indices(n_items: int, batch_size: int, step: int, seed: int, rank: int = 0, world: int = 1,
                  weights: np.ndarray | None = None) -> np.ndarray:
    """Indices of the batch for ``step``: epochs are seeded permutations, each process takes its own slice.

    ``step`` counts from 0. The last partial batch of an epoch wraps into the next epoch's permutation, so
    every batch is full and the schedule never depends on where a run was interrupted. With ``weights`` (one
    per item) each step's global batch is drawn with replacement in proportion to them instead, from a stream
    seeded by the step alone (so resumes stay exact).
    """
    global_batch = batch_size * world
    if weights is not None:
        chosen = np.random.default_rng([seed, step, 11]).choice(n_items, global_batch, p=weights / weights.sum())
        return chosen[rank * batch_size : (rank + 1) * batch_size]
    start = step * global_batch
    epoch_first, epoch_last = start // n_items, (start + global_batch - 1) // n_items
    order = np.concatenate([_epoch_permutation(n_items, seed, epoch) for epoch in range(epoch_first, epoch_last + 1)])
    offset = start - epoch_first * n_items
    chosen = order[offset : offset + global_batch]
    return chosen[rank * batch_size : (rank + 1) * batch_size]


def _epoch_permutation(n_items: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n_items)


def step_generator(seed: int, step: int, rank: int = 0, device: str | torch.device = "cpu") -> torch.Generator:
    """The random stream of one training step (noise, timesteps, condition dropout), reproducible on resume."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(np.random.default_rng([seed, step, rank, 7]).integers(2**62)))
    return generator


@dataclass
class ConditioningSpec:
    """How a case becomes text: which attributes lead the prompt, and whether its own text follows."""

    attribute_keys: Sequence[str] = ()
    include_text: bool = True

    def prompt(self, record: CaseRecord) -> str:
        return render_prompt(record.text if self.include_text else "", record.attributes, list(self.attribute_keys))

    def attribute_prompt(self, record: CaseRecord) -> str | None:
        """The case's prompt without its text: what sampling asks for (a real report is never a sampling prompt).
        None where that is the prompt itself (no text, or no attribute to show)."""
        if not (self.include_text and self.attribute_keys):
            return None
        return render_prompt("", record.attributes, list(self.attribute_keys))


class CachedImages:
    """Preprocessed images (and labels) of a set of cases, read from the cache on demand."""

    def __init__(self, records: Sequence[CaseRecord], cache_dir: str | Path, conditioning: ConditioningSpec):
        if not records:
            raise ValueError("no cases to train on")
        self.records = list(records)
        self.cache_dir = Path(cache_dir)
        self.prompts = [conditioning.prompt(record) for record in self.records]
        shorter = [conditioning.attribute_prompt(record) for record in self.records]
        self.attribute_prompts = None if shorter.count(None) == len(shorter) else shorter
        self.spacings = torch.tensor([_grid_spacing(self._path(r)) for r in self.records], dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.records)

    def _path(self, record: CaseRecord) -> Path:
        return self.cache_dir / f"{record.case_id}.safetensors"

    def images(self, indices: Sequence[int]) -> torch.Tensor:
        return torch.stack([load_file(str(self._path(self.records[i])))["image"] for i in indices])

    def label_maps(self) -> torch.Tensor:
        """(N, 1, *shape) integer label maps of every case, for a ControlNet; every case needs one."""
        unlabelled = sum(record.label is None for record in self.records)
        if unlabelled:
            raise UserInputError("conditioning.use_masks", f"{unlabelled} of {len(self)} training cases have no "
                                 "label map", "ingest a label map with every case, or set use_masks: false")
        maps = [load_file(str(self._path(record)))["label"] for record in self.records]
        return torch.stack([labels if labels.ndim > len(record.shape) else labels.unsqueeze(0)
                            for labels, record in zip(maps, self.records)]).long()

    def batch(self, indices: Sequence[int]) -> dict:
        return {"images": self.images(indices), "prompts": [self.prompts[i] for i in indices],
                "spacing": self.spacings[list(indices)]}


def balance_weights(records: Sequence[CaseRecord], attribute: str) -> np.ndarray:
    """One weight per case, 1 / (cases sharing its value of ``attribute``): drawn by these, every value (a rare
    finding as much as 'none') fills the same share of the batches. Cases without the attribute form one group."""
    values = [str(record.attributes.get(attribute)) for record in records]
    counts = Counter(values)
    return np.array([1.0 / counts[value] for value in values])


def training_prompts(batch: dict, text_dropout: float, generator: torch.Generator) -> list[str]:
    """A batch's prompts as training shows them: each case's attribute prompt instead of its whole one (attributes
    + text) with probability ``text_dropout``, since sampling asks in attributes alone. Without attribute prompts
    in the batch, or at 0, nothing is drawn from ``generator``, so runs without text keep their random streams."""
    prompts = batch["prompts"]
    if not text_dropout or "attribute_prompts" not in batch:
        return prompts
    shorten = torch.rand(len(prompts), generator=generator) < text_dropout
    return [short if cut else whole for whole, short, cut in zip(prompts, batch["attribute_prompts"], shorten.tolist())]


def _grid_spacing(path: Path) -> list[float]:
    """The case's voxel spacing, reading only its affine (not the image) from the cache file."""
    with safe_open(str(path), framework="numpy") as handle:
        return list(spacing_of(handle.get_tensor("affine")))


class CachedLatents:
    """Latent means and standard deviations of a set of cases, encoded once by the trained autoencoder.

    Each step samples z = mu + sigma * eps from the stored posterior, which is what the diffusion model would
    see had every batch been encoded afresh, at a fraction of the cost.
    """

    def __init__(self, mu: torch.Tensor, sigma: torch.Tensor, prompts: Sequence[str], spacing: torch.Tensor,
                 class_labels: torch.Tensor | None = None, attribute_prompts: Sequence[str] | None = None):
        self.mu, self.sigma, self.prompts, self.spacing = mu, sigma, list(prompts), spacing
        # The prompts without the cases' text (``ConditioningSpec.attribute_prompt``), or None: see the trainer's
        # text dropout.
        self.attribute_prompts = None if attribute_prompts is None else list(attribute_prompts)
        self.class_labels = class_labels  # (N,) class indices, 0 = none; set by the trainer's caller
        self.label_maps: torch.Tensor | None = None  # (N, 1, *image_shape) integer labels, for a ControlNet
        self.row_weights: np.ndarray | None = None  # (N,) how often each case is drawn (``balance_weights``)

    @classmethod
    def of(cls, images: CachedImages, mu: torch.Tensor, sigma: torch.Tensor) -> CachedLatents:
        """Latents of ``images`` (row for row), with their prompts and spacings."""
        return cls(mu, sigma, images.prompts, images.spacings, attribute_prompts=images.attribute_prompts)

    def with_values(self, mu: torch.Tensor, sigma: torch.Tensor) -> CachedLatents:
        """Other values of the same cases, with their prompts, spacings, classes and draw weights (what a mask
        generator learns)."""
        other = CachedLatents(mu, sigma, self.prompts, self.spacing, self.class_labels, self.attribute_prompts)
        other.row_weights = self.row_weights
        return other

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(self, indices: Sequence[int], generator: torch.Generator) -> dict:
        index = torch.as_tensor(np.asarray(indices))
        mu, sigma = self.mu[index], self.sigma[index]
        noise = torch.randn(mu.shape, generator=generator, dtype=mu.dtype)
        batch = {"latents": mu + sigma * noise, "prompts": [self.prompts[i] for i in indices],
                 "spacing": self.spacing[index]}
        if self.attribute_prompts is not None:
            batch["attribute_prompts"] = [self.attribute_prompts[i] for i in indices]
        if self.class_labels is not None:
            batch["class_labels"] = self.class_labels[index]
        if self.label_maps is not None:
            batch["label_maps"] = self.label_maps[index]
        return batch

    def save(self, path: str | Path) -> Path:
        """The encoded values only: prompts follow the conditioning settings, which may change while the
        autoencoder (and so its latents) stays."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp")
        save_file({"mu": self.mu.contiguous(), "sigma": self.sigma.contiguous()}, str(temporary))
        temporary.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, images: CachedImages) -> CachedLatents:
        """The values ``save`` wrote for ``images``, with the images' own (current) prompts."""
        tensors = load_file(str(path))
        return cls.of(images, tensors["mu"], tensors["sigma"])

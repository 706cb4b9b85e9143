"""A small segmenter trained on real images: the judge of mask adherence and the model of segmentation utility.

Mask adherence asks whether a generated image shows the structures its conditioning mask drew; a segmenter
trained on real images answers it by segmenting the sample and comparing with that mask. Utility asks
whether a segmenter trained on synthetic pairs works on real images. Both need the same thing: a MONAI UNet,
seeded so that two runs on the same data give the same network, and per-label Dice.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.networks.nets import UNet

from .image_sets import map_batches

__all__ = ["Segmenter", "per_label_dice"]

ArrayLike = np.ndarray | torch.Tensor


class Segmenter:
    """MONAI ``UNet`` over images in [-1, 1] (N, *spatial), predicting integer label maps 0..num_classes-1.

    Every down-sampling halves the grid, so inputs are padded (edge values, background labels) to a multiple
    of 2^depth and predictions cropped back: any grid works. Instance normalisation (MONAI's default) and
    ``eval()`` at prediction make a prediction independent of the batch it is in.
    """

    def __init__(self, spatial_dims: int, num_classes: int, channels: Sequence[int] = (16, 32, 64, 128),
                 seed: int = 0, num_res_units: int = 1, device: str | torch.device = "cpu") -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + at least one label), got {num_classes}")
        self.spatial_dims = spatial_dims
        self.num_classes = num_classes
        self.seed = seed
        self.device = torch.device(device)
        self.multiple = 2 ** (len(channels) - 1)
        # A private RNG state for the weights: the same seed gives the same network whatever ran before.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.network = UNet(spatial_dims=spatial_dims, in_channels=1, out_channels=num_classes,
                                channels=tuple(channels), strides=(2,) * (len(channels) - 1),
                                num_res_units=num_res_units).to(self.device)

    def fit(self, images: ArrayLike, masks: ArrayLike, steps: int = 300, batch_size: int = 16,
            learning_rate: float = 1e-3, augment: bool = True) -> Segmenter:
        """Adam on Dice + cross-entropy over random batches (with replacement, seeded).

        Augmentation is small shifts and intensity scale/offset/noise only: flips would swap left and right
        structures, which are different labels in chest and torso label maps.
        """
        images, masks = _rows_source(images), _rows_source(masks)
        if len(images) == 0:
            raise ValueError("Segmenter.fit needs at least one image")
        if len(masks) != len(images):
            raise ValueError(f"{len(images)} images but {len(masks)} masks")
        # Batches are gathered (and padded) as they are drawn: a set held on disk is not read whole.
        low, high = _label_range(masks)
        if high >= self.num_classes or low < 0:
            raise ValueError(f"mask labels must lie in 0..{self.num_classes - 1}, found {low}..{high}")
        generator = torch.Generator().manual_seed(self.seed)
        loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
        optimizer = torch.optim.Adam(self.network.parameters(), lr=learning_rate)
        self.network.train()
        for _ in range(steps):
            rows = torch.randint(0, len(images), (batch_size,), generator=generator).numpy()
            x = self._as_input(images[rows])
            y = torch.as_tensor(np.asarray(masks[rows]), dtype=torch.long).reshape(x.shape)
            x, y = self._pad(x, -1.0), self._pad(y, 0)
            if augment:
                x, y = _augment(x, y, generator)
            loss = loss_function(self.network(x.to(self.device)), y.to(self.device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        self.network.eval()
        return self

    @torch.no_grad()
    def predict(self, images: ArrayLike, batch_size: int = 32) -> np.ndarray:
        """Integer label maps (N, *spatial) as int64."""
        self.network.eval()
        x_all = self._as_input(images)
        spatial = x_all.shape[2:]
        padded = self._pad(x_all, -1.0)
        outputs = [self.network(padded[i:i + batch_size].to(self.device)).argmax(1).cpu()
                   for i in range(0, len(padded), batch_size)]
        labels = torch.cat(outputs) if outputs else torch.zeros((0, *padded.shape[2:]), dtype=torch.long)
        crop = (slice(None),) + tuple(slice(0, n) for n in spatial)
        return labels[crop].numpy().astype(np.int64)

    def _as_input(self, images: ArrayLike) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(images), dtype=torch.float32)
        if x.ndim != self.spatial_dims + 1:
            raise ValueError(f"expected images of shape (N, {self.spatial_dims} spatial axes), got {tuple(x.shape)}")
        return x[:, None]

    def _pad(self, x: torch.Tensor, value: float) -> torch.Tensor:
        """Pad the trailing spatial axes up to a multiple of 2^depth (at the far end, so crops are simple)."""
        widths: list[int] = []
        for n in reversed(x.shape[2:]):
            widths += [0, (-n) % self.multiple]
        if not any(widths):
            return x
        return F.pad(x, widths, value=value)


def _rows_source(array):
    """What ``fit`` draws rows from: numpy arrays, memory-mapped ones and ``ConcatenatedRows`` as they are (indexed
    a batch at a time); a tensor as its numpy view."""
    return array.cpu().numpy() if isinstance(array, torch.Tensor) else array


def _label_range(masks) -> tuple[int, int]:
    """Smallest and largest label, a batch of rows at a time."""
    ranges = map_batches(lambda part: np.array([[masks[part].min(), masks[part].max()]]), len(masks))
    return int(ranges[:, 0].min()), int(ranges[:, 1].max())


def _augment(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image integer shifts (up to 1/8 of each axis, new border = background) and intensity jitter."""
    n, spatial = len(x), x.shape[2:]
    shifted_x, shifted_y = torch.full_like(x, -1.0), torch.zeros_like(y)
    for i in range(n):
        source, target = [slice(None)], [slice(None)]
        for size in spatial:
            limit = max(size // 8, 0)
            s = int(torch.randint(-limit, limit + 1, (1,), generator=generator)) if limit else 0
            source.append(slice(max(-s, 0), size - max(s, 0)))
            target.append(slice(max(s, 0), size - max(-s, 0)))
        shifted_x[i][tuple(target)] = x[i][tuple(source)]
        shifted_y[i][tuple(target)] = y[i][tuple(source)]
    shape = (n, 1) + (1,) * len(spatial)
    scale = 1.0 + 0.1 * (2 * torch.rand(shape, generator=generator) - 1)
    offset = 0.1 * (2 * torch.rand(shape, generator=generator) - 1)
    noise = 0.02 * torch.randn(shifted_x.shape, generator=generator)
    return shifted_x * scale + offset + noise, shifted_y


def per_label_dice(predicted: ArrayLike, target: ArrayLike, labels: Sequence[int]) -> np.ndarray:
    """Dice of each label in each image, (N, L) float64.

    NaN where a label is absent from both the prediction and the target: there is nothing to agree on, and
    counting it as 1 (or 0) would reward (or punish) a model for a structure that is not there. Averages over
    images therefore use ``nanmean``. A label present in only one of the two scores 0.
    """
    predicted, target = np.asarray(predicted), np.asarray(target)
    if predicted.shape != target.shape:
        raise ValueError(f"prediction {predicted.shape} and target {target.shape} differ in shape")
    n = len(predicted)
    flat_p, flat_t = predicted.reshape(n, -1), target.reshape(n, -1)
    dice = np.full((n, len(labels)), np.nan)
    for j, label in enumerate(labels):
        p, t = flat_p == label, flat_t == label
        total = p.sum(1) + t.sum(1)
        overlap = (p & t).sum(1)
        present = total > 0
        dice[present, j] = 2.0 * overlap[present] / total[present]
    return dice

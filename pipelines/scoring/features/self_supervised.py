"""F2: a self-supervised (SimCLR) encoder trained on the real images of the run, offline and from scratch.

No pretrained medical encoder can be downloaded here, so F2 is learned from the data being scored: two
strong augmentations of each image must embed close together and away from the other images of the batch
(NT-Xent loss). The embedding used for scoring is the encoder output, not the projection head's (SimCLR:
the head discards what the augmentations vary, which copy detection and realism still need), L2-normalised
so cosine similarity is a dot product.

Train on train + holdout together. The privacy scores ask whether synthetic images sit closer to training
images than to unseen holdout images; an encoder fitted on the training images alone would embed them more
sharply than holdout images and bias that comparison towards "memorised" (fitted on holdout alone, the
reverse). On the union the two real sets are exchangeable for the encoder. Synthetic images are never used.

3D volumes (2.5D): one 2D encoder is trained on slices from the three planes, and a volume's embedding is
the concatenation of the mean normalised slice embedding per plane, in the order axial, coronal, sagittal
(slices along spatial axes 2, 1, 0 of an RAS array), re-normalised: dimension 3 * embedding_dim. Only the
central ``CENTRAL_SLICE_FRACTION`` of each axis is used for training and for the mean, since the outer slices
of padded volumes are often empty and identical across cases.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from safetensors.torch import load_file, save_file
from torch import nn

from .augment import augment
from .base import check_images, chunks

__all__ = ["CENTRAL_SLICE_FRACTION", "SelfSupervisedEncoder", "augment", "nt_xent_loss"]

CENTRAL_SLICE_FRACTION = 0.8
PLANE_AXES = {"axial": 2, "coronal": 1, "sagittal": 0}  # plane -> spatial axis the slices are taken along
_WEIGHTS_FILE, _CONFIG_FILE = "model.safetensors", "config.json"


def nt_xent_loss(first: torch.Tensor, second: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalised-temperature cross entropy: each view must pick its partner among the 2B - 1 others."""
    z = F.normalize(torch.cat([first, second]), dim=1)
    similarity = z @ z.T / temperature
    similarity.fill_diagonal_(float("-inf"))
    n = first.shape[0]
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(similarity, partner)


class _Encoder(nn.Module):
    """2D conv stages (strided conv + conv, BatchNorm, LeakyReLU) -> global average -> linear.

    BatchNorm uses batch statistics while training (it speeds up contrastive learning markedly on small
    sets) and its running statistics in eval mode, which ``extract`` always uses: embeddings never depend
    on the batch.
    """

    def __init__(self, channels: Sequence[int], embedding_dim: int):
        super().__init__()
        layers, inputs = [], 1
        for width in channels:
            layers += [Convolution(2, inputs, width, strides=2, kernel_size=3, norm="batch", act="leakyrelu"),
                       Convolution(2, width, width, strides=1, kernel_size=3, norm="batch", act="leakyrelu")]
            inputs = width
        self.stages = nn.Sequential(*layers)
        self.linear = nn.Linear(inputs, embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.stages(x).mean(dim=(2, 3)))


class SelfSupervisedEncoder:
    """SimCLR encoder + projection head; ``fit`` on real images, ``extract`` L2-normalised embeddings.

    spatial_dims: 2, or 3 for volumes through 2.5D slices (see the module docstring). embedding_dim: encoder
    output size (the volume embedding is 3x that). temperature: NT-Xent temperature (0.1-0.5 typical).
    """

    name = "self_supervised"

    def __init__(self, spatial_dims: int, embedding_dim: int = 128, seed: int = 0,
                 channels: Sequence[int] = (16, 32, 64, 128), projection_dim: int = 64, temperature: float = 0.2,
                 augment_strength: float = 1.0, device: str | torch.device = "cpu"):
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if not 0.0 < temperature <= 1.0:
            raise ValueError(f"temperature must be in (0, 1], got {temperature}")
        self.spatial_dims = spatial_dims
        self.embedding_dim = int(embedding_dim)
        self.seed = int(seed)
        self.channels = tuple(int(c) for c in channels)
        self.projection_dim = int(projection_dim)
        self.temperature = float(temperature)
        self.augment_strength = float(augment_strength)
        self.steps_trained = 0
        self.device = torch.device(device)
        with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's RNG
            torch.manual_seed(self.seed)
            self.encoder = _Encoder(self.channels, self.embedding_dim)
            self.head = nn.Sequential(nn.Linear(self.embedding_dim, self.embedding_dim), nn.ReLU(),
                                      nn.Linear(self.embedding_dim, self.projection_dim))
        self.encoder.to(self.device).eval()
        self.head.to(self.device).eval()

    @property
    def num_features(self) -> int:
        return self.embedding_dim * (3 if self.spatial_dims == 3 else 1)

    # ----- training -----------------------------------------------------------------------------------
    def fit(self, images: np.ndarray, steps: int = 300, batch_size: int = 64, learning_rate: float = 1e-3
            ) -> SelfSupervisedEncoder:
        """Train on ``images`` (N, *spatial): pass train and holdout images together (module docstring: why)."""
        array = torch.from_numpy(np.ascontiguousarray(check_images(images, self.spatial_dims, "SelfSupervisedEncoder")))
        if len(array) < 2 or batch_size < 2:
            raise ValueError(f"SelfSupervisedEncoder.fit needs at least 2 images and batch_size >= 2 (the other images "
                             f"of a batch are the negatives), got {len(array)} images, batch_size={batch_size}")
        generator = torch.Generator().manual_seed(self.seed + 1)
        parameters = [*self.encoder.parameters(), *self.head.parameters()]
        optimizer = torch.optim.Adam(parameters, lr=learning_rate)
        self.encoder.train()
        self.head.train()
        for step in range(steps):
            rows = torch.randperm(len(array), generator=generator)[:batch_size]
            batch = array[rows] if self.spatial_dims == 2 else _random_slices(array[rows], step % 3, generator)
            batch = batch.to(self.device)
            views = [augment(batch.unsqueeze(1), generator, self.augment_strength) for _ in range(2)]
            loss = nt_xent_loss(*(self.head(self.encoder(v)) for v in views), self.temperature)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        self.steps_trained += steps
        self.encoder.eval()
        self.head.eval()
        return self

    # ----- embedding ----------------------------------------------------------------------------------
    @torch.no_grad()
    def extract(self, images: np.ndarray, masks: np.ndarray | None = None, batch_size: int = 64) -> np.ndarray:
        """float64 (N, num_features) unit-norm embeddings; ``masks`` are accepted for the interface and ignored."""
        array = check_images(images, self.spatial_dims, "SelfSupervisedEncoder")
        self.encoder.eval()
        if self.spatial_dims == 2:
            out = self._embed_slices(torch.from_numpy(np.ascontiguousarray(array)), batch_size)
        else:
            out = torch.stack([self._embed_volume(torch.from_numpy(np.ascontiguousarray(volume)), batch_size)
                               for volume in array]) if len(array) else torch.zeros((0, self.num_features))
        return out.double().numpy()

    def _embed_slices(self, slices: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Unit-norm encoder embeddings (n, embedding_dim) of 2D images (n, H, W)."""
        parts = [self.encoder(slices[part].unsqueeze(1).to(self.device)).cpu()
                 for part in chunks(len(slices), batch_size)]
        embedding = torch.cat(parts) if parts else torch.zeros((0, self.embedding_dim))
        return F.normalize(embedding, dim=1)

    def _embed_volume(self, volume: torch.Tensor, batch_size: int) -> torch.Tensor:
        per_plane = []
        for axis in PLANE_AXES.values():
            slices = volume.movedim(axis, 0)[_central_range(volume.shape[axis])]
            per_plane.append(self._embed_slices(slices, batch_size).mean(0))
        return F.normalize(torch.cat(per_plane), dim=0)

    # ----- persistence --------------------------------------------------------------------------------
    def config(self) -> dict:
        return {"spatial_dims": self.spatial_dims, "embedding_dim": self.embedding_dim, "seed": self.seed,
                "channels": list(self.channels), "projection_dim": self.projection_dim,
                "temperature": self.temperature, "augment_strength": self.augment_strength,
                "steps_trained": self.steps_trained}

    def save(self, path: str | Path) -> Path:
        """Write ``model.safetensors`` (encoder + head) and ``config.json`` into the folder ``path``."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"encoder.{k}": v.detach().cpu().contiguous() for k, v in self.encoder.state_dict().items()}
        tensors |= {f"head.{k}": v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
        for name, content in ((_WEIGHTS_FILE, None), (_CONFIG_FILE, json.dumps(self.config(), indent=2))):
            partial = folder / f".{name}.partial"  # written whole, then renamed: never a half-written cache
            if content is None:
                save_file(tensors, str(partial))
            else:
                partial.write_text(content)
            partial.replace(folder / name)
        return folder

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> SelfSupervisedEncoder:
        folder = Path(path)
        config = json.loads((folder / _CONFIG_FILE).read_text())
        steps_trained = config.pop("steps_trained", 0)
        model = cls(**config, device=device)
        tensors = load_file(str(folder / _WEIGHTS_FILE))
        for prefix, module in (("encoder.", model.encoder), ("head.", model.head)):
            module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        model.steps_trained = steps_trained
        return model


def _central_range(length: int) -> slice:
    """The central ``CENTRAL_SLICE_FRACTION`` of an axis (at least one slice)."""
    margin = int(length * (1.0 - CENTRAL_SLICE_FRACTION) / 2.0 + 1e-9)  # 1e-9: 10 * 0.1 must give 1, not 0
    return slice(margin, max(length - margin, margin + 1))


def _random_slices(volumes: torch.Tensor, plane: int, generator: torch.Generator) -> torch.Tensor:
    """One random central slice per volume (n, D, H, W) along the axis of the ``plane``-th entry of PLANE_AXES."""
    axis = list(PLANE_AXES.values())[plane]
    central = _central_range(volumes.shape[1 + axis])
    positions = torch.randint(central.start, central.stop, (len(volumes),), generator=generator)
    return torch.stack([volume.select(axis, int(p)) for volume, p in zip(volumes, positions)])

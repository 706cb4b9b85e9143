"""The CycleGAN baseline: learns an unpaired contrast mapping it was never shown in pairs, keeps the geometry,
saves without pickle and resumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from radsynth.generators.cycle_gan import CycleGANTrainer, RadsynthCycleGAN
from radsynth.generators.trainer import LoopSettings, read_metrics

from .test_generator_models import assert_saved_without_pickle

SIDE = 32


class DiscImages:
    """Discs on a background, in one of two contrasts: 'ct' bright on dark, 'mri' dark on bright (+ noise)."""

    def __init__(self, modality: str, n: int, seed: int):
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[:SIDE, :SIDE]
        centres, radii = rng.uniform(10, SIDE - 10, (n, 2)), rng.uniform(4, 9, n)
        self.discs = np.stack([(yy - cy) ** 2 + (xx - cx) ** 2 <= r**2 for (cy, cx), r in zip(centres, radii)])
        sign = 1.0 if modality == "ct" else -1.0
        noise = 0.05 * rng.standard_normal(self.discs.shape)
        self.stack = torch.as_tensor(sign * np.where(self.discs, 0.6, -0.6) + noise, dtype=torch.float32)[:, None]

    def __len__(self) -> int:
        return len(self.stack)

    def images(self, indices) -> torch.Tensor:
        return self.stack[list(indices)]


def tiny_cycle_gan() -> RadsynthCycleGAN:
    torch.manual_seed(0)
    return RadsynthCycleGAN(spatial_dims=2, modalities=("ct", "mri"), channels=(8, 16, 32), num_res_units=1)


def trainer(tmp_path, max_steps: int) -> CycleGANTrainer:
    # Unpaired: the two sets show different discs.
    sets = (DiscImages("ct", 64, seed=1), DiscImages("mri", 64, seed=2))
    settings = LoopSettings(max_steps=max_steps, checkpoint_every=max_steps, log_every=10, progress=False,
                            device="cpu")
    return CycleGANTrainer(tiny_cycle_gan(), sets, tmp_path / "run", settings, learning_rate=1e-3, batch_size=8,
                           discriminator_layers=2)


def test_unpaired_training_learns_the_contrast_and_keeps_each_disc_in_place(tmp_path):
    held_out = DiscImages("ct", 16, seed=3)
    truth = -held_out.stack  # the same discs in the other contrast, never shown in pairs
    untrained = tiny_cycle_gan()
    model = trainer(tmp_path, 150).fit().eval()
    with torch.no_grad():
        before = (untrained(held_out.stack, "ct", "mri") - truth).abs().mean()
        translated = model(held_out.stack, "ct", "mri")
        back = model(translated, "mri", "ct")
    after = (translated - truth).abs().mean()
    assert after < 0.4 * before and after < 0.25
    inside = translated[:, 0][torch.as_tensor(held_out.discs)].mean()
    outside = translated[:, 0][~torch.as_tensor(held_out.discs)].mean()
    assert inside < outside - 0.6  # each disc turned dark where it was, the background bright
    assert (back - held_out.stack).abs().mean() < 0.25  # the cycle returns the source


def test_saved_generators_reload_without_pickle_and_translate_alike(tmp_path):
    model = tiny_cycle_gan().eval()
    model.save_pretrained(tmp_path / "cycle_gan")
    assert_saved_without_pickle(tmp_path / "cycle_gan")
    loaded = RadsynthCycleGAN.from_pretrained(tmp_path / "cycle_gan").eval()
    images = DiscImages("mri", 2, seed=0).stack
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, "mri", "ct"), model(images, "mri", "ct"))
    with pytest.raises(ValueError, match="not ct -> xray"):
        model(images, "ct", "xray")
    with pytest.raises(ValueError, match="two different modalities"):
        RadsynthCycleGAN(modalities=("ct", "ct"))


def test_a_resumed_run_continues_the_same_losses(tmp_path):
    whole = trainer(tmp_path / "whole", 6)
    whole.fit()
    first = trainer(tmp_path / "resumed", 3)
    first.fit()
    resumed = trainer(tmp_path / "resumed", 6)
    resumed.loop.settings.checkpoint_every = 3
    assert resumed.loop.run(resumed.train_step) == 3  # resumed from the first run's checkpoint, not started over
    for name in ("cycle", "discriminator"):
        expected = read_metrics(tmp_path / "whole" / "run" / "metrics.csv", name)[6]
        assert read_metrics(tmp_path / "resumed" / "run" / "metrics.csv", name)[6] == pytest.approx(expected, rel=1e-4)

"""The shared training loop: deterministic batches, checkpoints, and exact resume after an interruption."""

import json

import numpy as np
import pytest
import torch

from radsynth.generators import compute
from radsynth.generators.data import batch_indices, step_generator
from radsynth.generators.trainer import LoopSettings, TrainingLoop, read_metrics


def test_batches_cover_each_epoch_once_and_processes_take_disjoint_slices():
    n, batch = 10, 3
    seen = np.concatenate([batch_indices(n, batch, step, seed=1) for step in range(10)])  # 30 items = 3 epochs
    for epoch in range(3):
        assert sorted(seen[epoch * n:(epoch + 1) * n]) == list(range(n))
    rank0 = batch_indices(n, 2, 3, seed=1, rank=0, world=2)
    rank1 = batch_indices(n, 2, 3, seed=1, rank=1, world=2)
    assert len(set(rank0) | set(rank1)) == 4
    assert np.array_equal(batch_indices(n, batch, 7, seed=1), batch_indices(n, batch, 7, seed=1))
    assert not np.array_equal(batch_indices(n, batch, 7, seed=1), batch_indices(n, batch, 7, seed=2))


class Interrupt(Exception):
    pass


def regression_run(run_dir, stop_at=None, max_steps=12, tensorboard=False, tick=None, max_minutes=None):
    """A tiny model fitted with Adam and a cosine schedule; randomness comes from the step number only."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_steps)
    loop = TrainingLoop(run_dir, LoopSettings(max_steps=max_steps, checkpoint_every=4, keep_checkpoints=2,
                                              log_every=1, device="cpu", progress=False, tensorboard=tensorboard,
                                              max_minutes=max_minutes))
    model, optimizer, schedule = loop.accelerator.prepare(model, optimizer, schedule)
    weights = torch.tensor([[1.0, -2.0, 0.5, 3.0]])

    def train_step(step):
        if stop_at is not None and step == stop_at:
            raise Interrupt
        if tick is not None:
            tick()
        generator = step_generator(seed=3, step=step)
        x = torch.randn(16, 4, generator=generator)
        y = x @ weights.T + 0.1 * torch.randn(16, 1, generator=generator)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loop.accelerator.backward(loss)
        optimizer.step()
        schedule.step()
        return {"loss": loss.item(), "lr": schedule.get_last_lr()[0]}

    return loop, loop.run(train_step)


def test_an_interrupted_run_resumes_from_its_last_checkpoint_and_continues_the_exact_curve(tmp_path):
    regression_run(tmp_path / "straight")
    straight = read_metrics(tmp_path / "straight" / "metrics.csv", "loss")
    assert straight[12] < straight[1] / 4  # it does learn

    with pytest.raises(Interrupt):
        regression_run(tmp_path / "killed", stop_at=6)  # steps 5 and 6 are logged, then lost: last checkpoint is 4
    assert sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()) == ["step-0000004"]
    loop, resumed_from = regression_run(tmp_path / "killed")
    assert resumed_from == 4 and loop.state.step == 12
    resumed = read_metrics(tmp_path / "killed" / "metrics.csv", "loss")
    assert sorted(resumed) == list(range(1, 13))  # no duplicated or missing steps
    np.testing.assert_allclose([resumed[s] for s in range(1, 13)], [straight[s] for s in range(1, 13)], rtol=1e-6)
    lr_straight = read_metrics(tmp_path / "straight" / "metrics.csv", "lr")
    assert read_metrics(tmp_path / "killed" / "metrics.csv", "lr") == lr_straight
    # Only the last K=2 checkpoints are kept.
    assert sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()) == ["step-0000008", "step-0000012"]


def test_compute_is_counted_to_the_last_checkpoint_so_a_resumed_run_adds_up_to_an_uninterrupted_one(tmp_path,
                                                                                                     monkeypatch):
    """A clock that moves one second per step: 12 steps cost 12 s, straight or killed at step 6 and resumed (the
    killed run's steps 5 and 6 were lost with it and are redone, so they are counted once)."""
    clock = [0.0]
    monkeypatch.setattr(compute, "_clock", lambda: clock[0])

    def tick():
        clock[0] += 1.0

    straight, _ = regression_run(tmp_path / "straight", tick=tick)
    with pytest.raises(Interrupt):
        regression_run(tmp_path / "killed", stop_at=6, tick=tick)
    resumed, _ = regression_run(tmp_path / "killed", tick=tick)
    assert straight.state.seconds == resumed.state.seconds == 12.0 and resumed.state.energy_j is None
    for run in ("straight", "killed"):
        record = json.loads((tmp_path / run / "compute.json").read_text())
        assert record["steps"] == 12 and record["seconds"] == 12.0 and record["processes"] == 1
        assert record["energy_j"] is None and record["device"].startswith("CPU")


def test_a_time_budget_stops_and_checkpoints_where_it_runs_out_and_is_remembered_on_rerun(tmp_path, monkeypatch):
    """A clock that moves one second per step and a 5-second budget: of 12 steps, 5 are trained and checkpointed
    (off the every-4 grid); run again, the spent budget is read from the checkpoint and nothing more is trained;
    without a budget the run goes on to max_steps on the same curve."""
    clock = [0.0]
    monkeypatch.setattr(compute, "_clock", lambda: clock[0])

    def tick():
        clock[0] += 1.0

    loop, _ = regression_run(tmp_path / "run", tick=tick, max_minutes=5 / 60)
    assert loop.state.step == 5 and loop.state.seconds == 5.0
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-0000004", "step-0000005"]
    assert max(read_metrics(tmp_path / "run" / "metrics.csv", "loss")) == 5
    again, resumed_from = regression_run(tmp_path / "run", tick=tick, max_minutes=5 / 60)
    assert resumed_from == 5 and again.state.step == 5
    finished, _ = regression_run(tmp_path / "run", tick=tick)
    regression_run(tmp_path / "straight")
    assert finished.state.step == 12
    np.testing.assert_allclose(list(read_metrics(tmp_path / "run" / "metrics.csv", "loss").values()),
                               list(read_metrics(tmp_path / "straight" / "metrics.csv", "loss").values()), rtol=1e-6)


def test_a_finished_run_does_nothing_when_started_again(tmp_path):
    regression_run(tmp_path / "run")
    before = (tmp_path / "run" / "metrics.csv").read_text()
    loop, resumed_from = regression_run(tmp_path / "run")
    assert resumed_from == 12 and (tmp_path / "run" / "metrics.csv").read_text() == before


def test_tensorboard_events_carry_the_same_curve_as_the_csv(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    regression_run(tmp_path / "run", tensorboard=True)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    logged = {event.step: event.value for event in events.Scalars("train/loss")}
    csv_curve = read_metrics(tmp_path / "run" / "metrics.csv", "loss")
    assert sorted(logged) == sorted(csv_curve) == list(range(1, 13))
    np.testing.assert_allclose([logged[s] for s in range(1, 13)], [csv_curve[s] for s in range(1, 13)], rtol=1e-6)


class Payload:
    """A pickle that runs code when loaded: it writes the file it names."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("planted", ["optimizer.bin", "custom_checkpoint_0.pkl"])
def test_a_pickle_planted_in_a_checkpoint_never_runs(tmp_path, planted):
    import pickle

    from radsynth.configs import UserInputError

    with pytest.raises(Interrupt):
        regression_run(tmp_path / "run", stop_at=6)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-0000004"
    assert {"loop.json", "loop.safetensors"} <= {p.name for p in checkpoint.iterdir()}
    assert not list(checkpoint.glob("custom_checkpoint_*"))  # the loop's own state is not pickled
    marker = tmp_path / "payload-ran"
    (checkpoint / planted).write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(UserInputError) as caught:
        regression_run(tmp_path / "run")
    expected = {"optimizer.bin": "holds a pickle that is not plain weights",
                "custom_checkpoint_0.pkl": "a pickled object radsynth does not write"}[planted]
    assert expected in str(caught.value) and "\n" not in str(caught.value)
    assert not marker.exists()


@pytest.mark.parametrize(("cpu_bf16", "cpu_amx", "expected"), [(True, False, "bf16"), (False, True, "bf16"),
                                                                (False, False, "no")])
def test_auto_precision_is_bf16_only_where_the_cpu_computes_it_natively(monkeypatch, cpu_bf16, cpu_amx, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: cpu_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: cpu_amx)
    assert compute.resolve_precision("auto", "auto") == compute.resolve_precision("auto", "cpu") == expected
    assert compute.resolve_precision("auto", "cpu", spatial_dims=3) == "no"  # 3D bf16 backward on a CPU: see there
    # A precision that is named is kept, whatever the machine.
    assert [compute.resolve_precision(p, "cpu", 3) for p in ("no", "bf16", "fp16")] == ["no", "bf16", "fp16"]


@pytest.mark.parametrize(("gpu_bf16", "expected"), [(True, "bf16"), (False, "no")])
def test_auto_precision_on_a_gpu_follows_its_bf16_support(monkeypatch, gpu_bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: gpu_bf16)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: not gpu_bf16)  # the CPU is not asked
    assert compute.resolve_precision("auto", "auto", 3) == compute.resolve_precision("auto", "cuda:0") == expected
    assert compute.resolve_precision("auto", "mps") == "no"

"""The training loop every generator shares: accelerate, checkpoints you can kill and resume, metrics.

A trainer (``AutoencoderTrainer``, ``DiffusionTrainer``) supplies ``train_step(step) -> logs``, which draws its
batch and randomness from ``step`` alone (see ``generators.data``). The loop counts optimizer steps, writes
metrics to CSV, saves checkpoints (models, optimizers, LR schedulers, RNG through ``accelerate``; the step, EMA
and other registered states as safetensors + JSON) every N steps keeping the last K, and on start resumes from
the newest complete checkpoint. Because nothing random is carried between steps except what a checkpoint holds,
a resumed run continues the exact loss curve.

Nothing is unpickled on resume: accelerate loads models from safetensors and optimizer, scheduler and RNG
states with ``torch.load(weights_only=True)``; the loop's own states never go through its pickled
``custom_checkpoint`` files. A checkpoint holding a pickle that would run code is refused with one line.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from radsynth.configs.errors import UserInputError

from .compute import ComputeMeter

CHECKPOINT_PATTERN = re.compile(r"^step-(\d{7})$")
TENSOR_LIST = "__tensors__"  # in a state's JSON: this key is a list of that many tensors in its safetensors
COMPUTE_FILE = "compute.json"


@dataclass
class LoopSettings:
    max_steps: int
    max_minutes: float | None = None  # a time budget beside max_steps: training seconds, resumed runs included
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    validate_every: int | None = None
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16" (``compute.resolve_precision`` turns "auto" into one)
    device: str = "auto"  # "auto" | "cpu" | "cuda[:N]"
    progress: bool = True
    tensorboard: bool = False  # metrics.csv always; TensorBoard events in <run>/tensorboard as well


class LoopState:
    """The step counter and the compute spent to reach it, saved inside every checkpoint with the models, so a
    resumed run's totals add up to an uninterrupted one's (the killed run's work after its last checkpoint, redone,
    is not counted twice)."""

    def __init__(self) -> None:
        self.step = 0
        self.seconds = 0.0
        self.energy_j: float | None = None  # None: not measured (no NVIDIA energy counter)

    def state_dict(self) -> dict:
        return {"step": self.step, "seconds": self.seconds, "energy_j": self.energy_j}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.seconds = float(state.get("seconds", 0.0))  # checkpoints from before compute was counted: 0
        self.energy_j = state.get("energy_j")

    def add(self, seconds: float, joules: float | None) -> None:
        self.seconds += seconds
        if joules is not None:
            self.energy_j = (self.energy_j or 0.0) + joules


def write_compute(run_dir: Path, state: LoopState, device: str, processes: int) -> Path:
    """``compute.json``: what this part's training cost up to its last checkpoint (read into the model card)."""
    path = run_dir / COMPUTE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"steps": state.step, "seconds": round(state.seconds, 2),
                                "energy_j": None if state.energy_j is None else round(state.energy_j, 1),
                                "device": device, "processes": processes}))
    return path


def save_state(obj, folder: Path, name: str) -> None:
    """``obj.state_dict()`` as ``<name>.safetensors`` (its tensors, lists of tensors as ``key.i``) and
    ``<name>.json`` (everything else), written to be read back by ``load_state`` without a pickle."""
    tensors, values = {}, {}
    for key, value in obj.state_dict().items():
        if torch.is_tensor(value):
            tensors[key] = value.detach().cpu().contiguous()
        elif isinstance(value, (list, tuple)) and value and all(torch.is_tensor(v) for v in value):
            tensors.update({f"{key}.{i}": v.detach().cpu().contiguous() for i, v in enumerate(value)})
            values[key] = {TENSOR_LIST: len(value)}
        else:
            values[key] = value
    save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(values))


def load_state(obj, folder: Path, name: str, device: torch.device | str = "cpu") -> None:
    device = torch.device(device)  # safetensors takes "cpu" but not a group's "cpu:0"
    tensors = load_file(str(folder / f"{name}.safetensors"), device="cpu" if device.type == "cpu" else str(device))
    values = json.loads((folder / f"{name}.json").read_text())
    state = {key: tensor for key, tensor in tensors.items() if key.rsplit(".", 1)[0] not in values}
    for key, value in values.items():
        is_list = isinstance(value, dict) and TENSOR_LIST in value
        state[key] = [tensors[f"{key}.{i}"] for i in range(value[TENSOR_LIST])] if is_list else value
    obj.load_state_dict(state)


def check_device(device: str) -> None:
    """``runtime.device`` names a device this machine has; "auto" always does."""
    problem = None
    if device.startswith("cuda"):
        index = int(device.split(":")[1]) if ":" in device else 0
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        problem = f"'{device}' asked for, but {visible} CUDA GPUs are visible" if index >= visible else None
    elif device == "mps" and not torch.backends.mps.is_available():
        problem = "'mps' asked for, but this machine has no Apple GPU"
    if problem:
        raise UserInputError("runtime.device", problem, "auto (a GPU when there is one, else the CPU) or cpu")


def trains_on_cpu(device: str) -> bool:
    return device == "cpu" or (device == "auto" and not torch.cuda.is_available())


def process_group(device: str) -> PartialState:
    """This process's place among the launched training processes (rank, count, main or not).

    accelerate keeps the first one made for the whole process, and only one made for the CPU joins a group of CPU
    processes (gloo, under torchrun): the first call must say where training runs.
    """
    return PartialState(cpu=trains_on_cpu(device))


def make_accelerator(settings: LoopSettings) -> Accelerator:
    # accelerate keeps one process-wide state: a second training in the same process (a notebook, the build
    # flow) with another precision must clear it. The distributed (partial) state is kept.
    check_device(settings.device)
    process_group(settings.device)
    AcceleratorState._reset_state()
    return Accelerator(mixed_precision=settings.mixed_precision, cpu=trains_on_cpu(settings.device),
                       gradient_accumulation_steps=settings.gradient_accumulation_steps)


class TrainingLoop:
    def __init__(self, run_dir: str | Path, settings: LoopSettings, accelerator: Accelerator | None = None):
        self.run_dir = Path(run_dir)
        self.settings = settings
        self.accelerator = accelerator or make_accelerator(settings)
        self.state = LoopState()
        self.at_last_step = False  # while ``validate`` runs: whether its step is the run's last (steps or time)
        self.states = {"loop": self.state}  # saved beside accelerate's files, without pickle
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.metrics_path = self.run_dir / "metrics.csv"
        log_events = settings.tensorboard and self.accelerator.is_main_process
        self.tensorboard = _tensorboard_writer(self.run_dir) if log_events else None

    def register_state(self, name: str, obj) -> None:
        """Something beside the prepared models, optimizer and scheduler that a checkpoint must bring back (an EMA,
        a target network): anything with ``state_dict`` / ``load_state_dict`` of tensors and plain values."""
        self.states[name] = obj

    # ---------------------------------------------------------------------------------------- run
    def run(self, train_step: Callable[[int], dict[str, float]],
            validate: Callable[[int], dict[str, float] | None] | None = None) -> int:
        """Train until ``max_steps``; returns the step resumed from (0 for a fresh run)."""
        resumed_from = self.resume()
        settings = self.settings
        bar = tqdm(total=settings.max_steps, initial=self.state.step, desc=self.run_dir.name, unit="step",
                   disable=None if settings.progress and self.accelerator.is_main_process else True)
        started, steps_done = time.perf_counter(), 0
        meter = ComputeMeter(self.accelerator.device)
        while self.state.step < settings.max_steps and not self.out_of_time(meter):
            logs = train_step(self.state.step)
            self.state.step += 1
            steps_done += 1
            bar.update()
            step = self.state.step
            # The last step: max_steps, or the step at which the time budget ran out.
            last = step == settings.max_steps or self.out_of_time(meter)
            if step % settings.log_every == 0 or last:
                elapsed = time.perf_counter() - started
                logs = self._across_processes(logs)
                self._log(step, {**logs, "steps_per_s": steps_done / max(elapsed, 1e-9)})
                bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items()}, refresh=False)
            if validate and settings.validate_every and (step % settings.validate_every == 0 or last):
                self.at_last_step = last
                extra = validate(step)
                if extra:
                    self._log(step, extra, kind="validation")
            if step % settings.checkpoint_every == 0 or last:
                self.state.add(*meter.take())
                self.save_checkpoint()
        bar.close()
        if self.tensorboard is not None:
            self.tensorboard.flush()
        if self.accelerator.is_main_process:
            write_compute(self.run_dir, self.state, meter.device, self.accelerator.num_processes)
        return resumed_from

    def out_of_time(self, meter: ComputeMeter) -> bool:
        """Whether the time budget (``max_minutes``) is spent: this part's training seconds so far (the compute
        counted to the last checkpoint, earlier runs' included, and this run's since), so a killed and resumed run
        stops about where an uninterrupted one would. Every process stops together (the longest-running decides)."""
        if self.settings.max_minutes is None:
            return False
        spent = torch.tensor(float(self.state.seconds + meter.pending() >= 60.0 * self.settings.max_minutes))
        if self.accelerator.num_processes > 1:
            spent = self.accelerator.reduce(spent.to(self.accelerator.device), reduction="max").cpu()
        return bool(spent.item())

    # -------------------------------------------------------------------------------- checkpoints
    def checkpoints(self) -> list[Path]:
        if not self.checkpoint_dir.is_dir():
            return []
        found = [p for p in self.checkpoint_dir.iterdir() if CHECKPOINT_PATTERN.match(p.name) and p.is_dir()]
        return sorted(found)

    def save_checkpoint(self) -> Path:
        """accelerate's state, written to a temporary folder and renamed: a kill mid-save leaves no half checkpoint."""
        final = self.checkpoint_dir / f"step-{self.state.step:07d}"
        partial = self.checkpoint_dir / f".partial-{final.name}"
        main = self.accelerator.is_main_process
        if main:
            shutil.rmtree(partial, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(partial))  # every process: each saves its own RNG state
        self.accelerator.wait_for_everyone()
        if main:
            for name, obj in self.states.items():
                save_state(obj, partial, name)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            for old in self.checkpoints()[: -self.settings.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return final

    def resume(self) -> int:
        if self.accelerator.is_main_process and self.checkpoint_dir.is_dir():
            for partial in self.checkpoint_dir.glob(".partial-*"):  # a save killed midway
                shutil.rmtree(partial, ignore_errors=True)
        checkpoints = self.checkpoints()
        if not checkpoints:
            self._truncate_metrics(0)
            return 0
        checkpoint = checkpoints[-1]
        stray = sorted(path.name for path in checkpoint.glob("custom_checkpoint_*"))
        if stray:  # accelerate would unpickle these (weights_only=False); radsynth never writes them
            raise UserInputError(checkpoint / stray[0], "a pickled object radsynth does not write",
                                 "checkpoints radsynth wrote; delete this one to resume from the one before")
        try:
            self.accelerator.load_state(str(checkpoint))
            for name, obj in self.states.items():
                load_state(obj, checkpoint, name, self.accelerator.device)
        except pickle.UnpicklingError as error:  # torch.load(weights_only=True) met code, not weights
            raise UserInputError(checkpoint, f"holds a pickle that is not plain weights ({str(error).splitlines()[0]})",
                                 "checkpoints radsynth wrote; delete this one to resume from the one before") from None
        except FileNotFoundError as error:
            raise UserInputError(checkpoint, f"is incomplete or from an older radsynth ({Path(error.filename).name} "
                                 "missing)", "delete it to resume from the one before, or the run folder to start over"
                                 ) from None
        self._truncate_metrics(self.state.step)
        return self.state.step

    # ------------------------------------------------------------------------------------ metrics
    def _across_processes(self, logs: dict[str, float]) -> dict[str, float]:
        """A step's logged values averaged over the processes: each saw its own shard of the batch."""
        if self.accelerator.num_processes == 1 or not logs:
            return logs
        values = torch.tensor([float(v) for v in logs.values()], dtype=torch.float64, device=self.accelerator.device)
        return dict(zip(logs, self.accelerator.reduce(values, reduction="mean").tolist()))

    def _log(self, step: int, values: dict[str, float], kind: str = "train") -> None:
        if not self.accelerator.is_main_process:
            return
        new_file = not self.metrics_path.exists()
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a", newline="") as handle:
            writer = csv.writer(handle)
            if new_file:
                writer.writerow(["step", "kind", "name", "value"])
            for name, value in values.items():
                writer.writerow([step, kind, name, f"{float(value):.8g}"])
                if self.tensorboard is not None:
                    self.tensorboard.add_scalar(f"{kind}/{name}", float(value), step)

    def _truncate_metrics(self, step: int) -> None:
        """Drop rows a killed run logged after its last checkpoint, so the resumed curve continues cleanly."""
        if not self.accelerator.is_main_process or not self.metrics_path.exists():
            return
        with open(self.metrics_path, newline="") as handle:
            rows = list(csv.reader(handle))
        kept = [rows[0]] + [row for row in rows[1:] if int(row[0]) <= step]
        temporary = self.metrics_path.with_name(f".{self.metrics_path.name}.tmp")
        with open(temporary, "w", newline="") as handle:
            csv.writer(handle).writerows(kept)
        os.replace(temporary, self.metrics_path)


def _tensorboard_writer(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserInputError("runtime.tensorboard", "tensorboard is not installed",
                             "pip install 'radsynth[tensorboard]', or set runtime.tensorboard: false") from None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def read_metrics(path: str | Path, name: str, kind: str = "train") -> dict[int, float]:
    """One metric's curve from metrics.csv, by step."""
    with open(path, newline="") as handle:
        return {int(row["step"]): float(row["value"]) for row in csv.DictReader(handle)
                if row["name"] == name and row["kind"] == kind}

"""Training over several processes or machines (``runtime.launch``): ``radsynth train`` launches itself.

On GPUs the ranks start under ``accelerate launch --multi_gpu`` (NCCL); on CPUs under ``torchrun``, whose ranks
accelerate joins as a gloo group (``accelerate launch`` runs CPU ranks only through MPI). An accelerate config
file, when given, decides instead. Each rank trains on its shard of every batch; the main rank ingests, encodes
the latents cache and writes checkpoints, the model and the one JSON answer the launcher passes on.

Several machines: every machine runs the same ``radsynth train CONFIG`` with its own
``runtime.launch.machine_rank`` (the launcher on machine 0 prints the others' commands), on a filesystem they
all share at ``runtime.output_dir``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from radsynth.configs import RadsynthConfig, config_to_yaml
from radsynth.generators.trainer import trains_on_cpu
from radsynth.pipelines.data.io import write_text
from radsynth.pipelines.training import training_precision

LAUNCHED = "RADSYNTH_LAUNCHED"  # set for the launched ranks, so they train instead of launching again
logger = logging.getLogger(__name__)


def launched_here() -> bool:
    """Whether this process is one of a launch's ranks (and so must not launch one itself)."""
    return os.environ.get(LAUNCHED) == "1"


def launch_command(config: RadsynthConfig, config_path: Path) -> list[str]:
    """The launcher running ``radsynth train`` on this machine's ranks."""
    launch = config.runtime.launch
    train = ["-m", "radsynth.flows.cli", "train", str(config_path), "--json"]
    if launch.config_file or not trains_on_cpu(config.runtime.device):
        return [*_accelerate_launch(config), *train]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(launch.processes_per_machine)]
    if launch.num_machines == 1 and launch.main_process_port is None:
        command.append("--standalone")  # a free port on loopback
    else:
        command += ["--nnodes", str(launch.num_machines), "--node_rank", str(launch.machine_rank),
                    "--master_addr", launch.main_process_ip or "127.0.0.1",
                    "--master_port", str(launch.main_process_port or 29500)]
    return [*command, *train]


def _accelerate_launch(config: RadsynthConfig) -> list[str]:
    launch = config.runtime.launch
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if launch.config_file:
        command += ["--config_file", launch.config_file]
    given = launch.model_fields_set if launch.config_file else set(type(launch).model_fields)
    for field in ("num_processes", "num_machines", "machine_rank", "main_process_ip", "main_process_port"):
        if field in given and getattr(launch, field) is not None:
            command += [f"--{field}", str(getattr(launch, field))]
    if launch.num_processes > 1 and not launch.config_file:
        command.append("--multi_gpu")
    return [*command, "--mixed_precision", training_precision(config)]


def other_machines(config: RadsynthConfig, config_path: Path) -> list[str]:
    """The command each other machine runs to join this launch."""
    return [f"radsynth train {config_path} runtime.launch.machine_rank={rank}"
            for rank in range(1, config.runtime.launch.num_machines)]


def launch_training(config: RadsynthConfig, log: logging.Logger | logging.LoggerAdapter = logger) -> dict:
    """Run ``radsynth train`` on this machine's ranks and return the main rank's answer (on machine 0)."""
    launch = config.runtime.launch
    config_path = write_text(config.output_dir / "launch-config.yaml", config_to_yaml(config))
    command = launch_command(config, config_path)
    log.info("training with: %s", " ".join(command))
    if launch.machine_rank == 0:
        for line in other_machines(config, config_path):
            log.warning("start the other machines' ranks with: %s", line)
    env = {**os.environ, LAUNCHED: "1"}
    if trains_on_cpu(config.runtime.device) and "OMP_NUM_THREADS" not in env:
        # The machine's cores shared among its ranks (torchrun would give each one thread).
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // launch.processes_per_machine))
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"the training launch exited with code {done.returncode} (its stderr is above)")
    answers = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not answers:  # a machine other than the first: its ranks trained, the first machine's main one answers
        return {"command": "train", "machine_rank": launch.machine_rank, "processes": launch.num_processes,
                "launched": command}
    return {**json.loads(answers[-1]), "launched": command}

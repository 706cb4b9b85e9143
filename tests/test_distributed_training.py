"""Training over two processes on this CPU: ``radsynth train`` launches its ranks (gloo under torchrun), each trains
on its shard of every batch, the main one writes, and a run whose rank was killed resumes the same loss curve."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from radsynth.flows.launch import launch_command, other_machines
from radsynth.generators.trainer import read_metrics

from .test_flows import clean_env
from .test_training_stage import config_file

TWO_RANKS = ["runtime.launch.num_processes=2", "runtime.device=cpu", "diffusion.validate_every=1000"]


def train_command(path, *overrides) -> list[str]:
    return [sys.executable, "-m", "radsynth.flows.cli", "train", str(path), *overrides, "--json"]


def answers(done: subprocess.CompletedProcess) -> list[dict]:
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_two_processes_train_on_the_cpu_and_the_main_one_answers(tmp_path):
    run_dir = tmp_path / "two"
    path = config_file(tmp_path, run_dir, *TWO_RANKS, "diffusion.max_steps=6", "diffusion.checkpoint_every=3")
    done = subprocess.run(train_command(path), env=clean_env(), capture_output=True, text=True, timeout=600)

    [answer] = answers(done)  # one JSON line: the main rank's, passed on by the launcher
    assert answer["processes"] == 2 and answer["diffusion_steps"] == 6
    assert "torch.distributed.run" in answer["launched"] and "--nproc_per_node" in answer["launched"]
    assert (run_dir / "model" / "model_index.json").is_file()
    # The main rank alone logs (each step once, the ranks' mean) and checkpoints; one latents cache, no temporaries.
    assert sorted(read_metrics(run_dir / "train" / "diffusion" / "metrics.csv", "loss")) == list(range(1, 7))
    checkpoints = run_dir / "train" / "diffusion" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-0000003", "step-0000006"]
    # accelerate saves each rank's random state: both ranks took part in the checkpoint.
    assert {p.name for p in (checkpoints / "step-0000006").glob("random_states_*")} == {
        "random_states_0.pkl", "random_states_1.pkl"}
    assert sorted(p.name for p in (run_dir / "train").glob("*latents*")) == ["latents.json", "latents.safetensors"]


@pytest.mark.slow
def test_a_two_process_run_with_a_killed_rank_resumes_the_same_loss_curve(tmp_path):
    steps = [*TWO_RANKS, "diffusion.max_steps=40", "diffusion.checkpoint_every=4", "diffusion.log_every=1"]
    straight_dir = tmp_path / "straight"
    answers(subprocess.run(train_command(config_file(tmp_path, straight_dir, *steps)), env=clean_env(),
                           capture_output=True, text=True, timeout=600))
    straight = read_metrics(straight_dir / "train" / "diffusion" / "metrics.csv", "loss")

    killed_dir = tmp_path / "killed"
    path = config_file(tmp_path, killed_dir, *steps)
    launcher = subprocess.Popen(train_command(path), env=clean_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    checkpoint = killed_dir / "train" / "diffusion" / "checkpoints" / "step-0000008"
    deadline = time.time() + 300
    while time.time() < deadline and not checkpoint.is_dir() and launcher.poll() is None:
        time.sleep(0.05)
    ranks = [child for child in psutil.Process(launcher.pid).children(recursive=True)
             if "launch-config.yaml" in " ".join(child.cmdline()) and "torch.distributed.run" not in child.cmdline()]
    assert launcher.poll() is None and len(ranks) == 2, "training finished before a rank could be killed"
    ranks[1].send_signal(signal.SIGKILL)  # one rank dies: torchrun stops the other, the launch fails
    assert launcher.wait(timeout=120) != 0
    assert not (killed_dir / "model").exists()

    done = subprocess.run(train_command(path), env=clean_env(), capture_output=True, text=True, timeout=600)
    [answer] = answers(done)
    assert answer["processes"] == 2 and answer["diffusion_steps"] == 40 and 8 <= answer["resumed_from"] < 40
    resumed = read_metrics(killed_dir / "train" / "diffusion" / "metrics.csv", "loss")
    assert sorted(resumed) == list(range(1, 41))
    np.testing.assert_allclose([resumed[s] for s in range(1, 41)], [straight[s] for s in range(1, 41)], rtol=1e-5)


def test_the_launch_uses_torchrun_on_cpus_and_accelerate_on_gpus(tmp_path):
    from .test_training_stage import tiny_config

    cpu = tiny_config(tmp_path, "runtime.device=cpu", "runtime.launch.num_processes=4", "runtime.launch.num_machines=2",
                      "runtime.launch.machine_rank=1", "runtime.launch.main_process_ip=10.0.0.1")
    command = launch_command(cpu, tmp_path / "c.yaml")

    def flag(name):
        return command[command.index(name) + 1]

    assert command[1:3] == ["-m", "torch.distributed.run"] and flag("--nproc_per_node") == "2"
    assert flag("--nnodes") == "2" and flag("--node_rank") == "1" and flag("--master_addr") == "10.0.0.1"
    assert flag("--master_port") == "29500" and "--standalone" not in command
    assert command[-5:] == ["-m", "radsynth.flows.cli", "train", str(tmp_path / "c.yaml"), "--json"]
    assert other_machines(cpu, tmp_path / "c.yaml") == [f"radsynth train {tmp_path / 'c.yaml'} "
                                                        "runtime.launch.machine_rank=1"]
    one_machine = launch_command(tiny_config(tmp_path, "runtime.device=cpu", "runtime.launch.num_processes=2"),
                                 tmp_path / "c.yaml")
    assert "--standalone" in one_machine and "--nnodes" not in one_machine

    gpu = tiny_config(tmp_path, "runtime.device=cuda", "runtime.launch.num_processes=4", "runtime.launch.num_machines=2",
                      "runtime.launch.main_process_ip=10.0.0.1", "runtime.launch.main_process_port=29501",
                      "runtime.precision=bf16")
    command = launch_command(gpu, tmp_path / "c.yaml")
    assert command[1:3] == ["-m", "accelerate.commands.launch"] and "--multi_gpu" in command
    assert flag("--num_processes") == "4" and flag("--num_machines") == "2" and flag("--machine_rank") == "0"
    assert flag("--main_process_port") == "29501" and flag("--mixed_precision") == "bf16"
    # With an accelerate config file, only the settings given in radsynth's config override the file's.
    file_only = launch_command(tiny_config(tmp_path, "runtime.launch.config_file=acc.yaml"), tmp_path / "c.yaml")
    assert "--config_file" in file_only and "--num_processes" not in file_only and "--multi_gpu" not in file_only

"""Seconds per training step and peak memory of the generator networks at the demo sizes, on this CPU.

    python benchmarks/generator_step_time.py --steps 10 --threads 2 [--cases unet_3d_4x8cubed_b2 ...]

A step is forward + backward + Adam step in fp32 on random data: the autoencoder with the L1 + KL loss, the
UNet with an MSE loss against a random target and text context (B, 64, 256). Each case runs in a fresh
subprocess, so its peak resident memory (ru_maxrss) is its own; "baseline" is a process that imports the same
libraries and builds nothing. The load average is printed too: on a shared machine other processes slow the
steps down (OpenMP threads that wait on a busy core are far slower than a fair share). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

CASES = {
    "baseline": {},
    "autoencoder_2d_64x64_b8": dict(model="autoencoder", spatial_dims=2, side=64, batch=8),
    "unet_2d_4x16x16_b8": dict(model="unet", spatial_dims=2, side=16, batch=8),
    "autoencoder_3d_32cubed_b2": dict(model="autoencoder", spatial_dims=3, side=32, batch=2),
    "unet_3d_4x8cubed_b2": dict(model="unet", spatial_dims=3, side=8, batch=2),
}
AUTOENCODER = dict(channels=(32, 64, 64), latent_channels=4, norm_num_groups=32, num_res_blocks=1)
UNET = dict(channels=(64, 128, 128), attention_levels=(False, True, True), num_head_channels=32,
            cross_attention_dim=256, norm_num_groups=32, num_res_blocks=1)
CONTEXT_TOKENS = 64


def build_step(model: str, spatial_dims: int, side: int, batch: int):
    """The model and a closure doing one optimisation step on a fixed random batch."""
    import torch

    from radsynth.generators.autoencoder import RadsynthAutoencoder
    from radsynth.generators.losses import AutoencoderLoss
    from radsynth.generators.unet import RadsynthUNet

    spatial = (side,) * spatial_dims
    if model == "autoencoder":
        network = RadsynthAutoencoder(spatial_dims=spatial_dims, **AUTOENCODER)
        loss = AutoencoderLoss(kl_weight=1e-6, spatial_dims=spatial_dims)
        images = torch.rand(batch, 1, *spatial) * 2 - 1

        def objective():
            return loss.generator_loss(images, *network(images))[0]
    else:
        # The 3D model also gets the spacing token, as a 3D preset would use it.
        network = RadsynthUNet(spatial_dims=spatial_dims, use_spacing=spatial_dims == 3, **UNET)
        latents, target = torch.randn(batch, 4, *spatial), torch.randn(batch, 4, *spatial)
        context = torch.randn(batch, CONTEXT_TOKENS, UNET["cross_attention_dim"])
        timesteps = torch.randint(0, 1000, (batch,))
        spacing = torch.full((batch, spatial_dims), 1.5) if spatial_dims == 3 else None

        def objective():
            prediction = network(latents, timesteps, context, spacing=spacing)
            return torch.nn.functional.mse_loss(prediction, target)

    optimizer = torch.optim.Adam(network.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        objective().backward()
        optimizer.step()

    parameters = sum(p.numel() for p in network.parameters())
    return step, parameters


def busy_cpu_seconds() -> float | None:
    """CPU seconds all processes on the machine have used so far (Linux /proc/stat), or None elsewhere."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def run_case(name: str, steps: int, warmup: int, threads: int) -> dict:
    """Child process: time one case; report its own peak resident memory."""
    import torch

    import radsynth.generators.autoencoder  # noqa: F401  (the baseline imports what the cases import)
    import radsynth.generators.unet  # noqa: F401

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    result: dict = {"case": name}
    if CASES[name]:
        step, parameters = build_step(**CASES[name])
        for _ in range(warmup):
            step()
        times = []
        machine_before, own_before, wall_before = busy_cpu_seconds(), sum(os.times()[:2]), time.perf_counter()
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        machine_after, own_after, wall = busy_cpu_seconds(), sum(os.times()[:2]), time.perf_counter() - wall_before
        result.update(parameters=parameters, steps=steps, s_per_step_median=round(statistics.median(times), 4),
                      s_per_step_mean=round(statistics.fmean(times), 4), s_per_step_min=round(min(times), 4))
        if machine_before is not None:
            # Share of the machine's CPU that other processes took while this case ran. With 2 OpenMP threads
            # on 2 cores, even a modest share makes steps many times slower: read the timings next to it.
            others = (machine_after - machine_before) - (own_after - own_before)
            result["other_processes_cpu_share"] = round(max(others, 0.0) / (wall * os.cpu_count()), 2)
    # Linux reports ru_maxrss in KiB.
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", nargs="+", choices=[name for name in CASES if name != "baseline"],
                        default=[name for name in CASES if name != "baseline"], help="cases to run (default: all)")
    parser.add_argument("--case", choices=list(CASES), help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()

    if args.case:
        print(json.dumps(run_case(args.case, args.steps, args.warmup, args.threads)))
        return

    load_before = os.getloadavg()
    results = {}
    for name in ["baseline", *args.cases]:
        child = subprocess.run(
            [sys.executable, __file__, "--case", name, "--steps", str(args.steps), "--warmup", str(args.warmup),
             "--threads", str(args.threads)],
            capture_output=True, text=True, check=True,
        )
        results[name] = json.loads(child.stdout.strip().splitlines()[-1])
        results[name].pop("case")
    baseline = results["baseline"]["peak_rss_mib"]
    for name, result in results.items():
        if name != "baseline":
            result["peak_rss_above_baseline_mib"] = round(result["peak_rss_mib"] - baseline, 1)

    import torch

    report = {
        "precision": "fp32", "torch_threads": args.threads, "autoencoder": AUTOENCODER, "unet": UNET,
        "context_tokens": CONTEXT_TOKENS, "cases": results,
        "load_average_1min": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "torch": torch.__version__},
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()

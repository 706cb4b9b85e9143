"""What a run costs: wall-clock seconds, on which device, and on NVIDIA GPUs the energy the board counted.

Energy comes from NVML's total-energy counter (millijoules since the driver loaded; Volta and later), read through
``pynvml`` (the ``nvidia-ml-py`` package) when it is installed. Elsewhere it is None, and the cards say "not
measured": a CPU's energy is not estimated from a nominal power.
"""

from __future__ import annotations

import platform
import time

import torch

__all__ = ["ComputeMeter", "device_description"]

_clock = time.perf_counter  # a module attribute, so a test can drive the clock


def device_description(device: torch.device | str) -> str:
    """"NVIDIA H200" or "CPU (x86_64, 2 threads)": what the seconds were spent on."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


class ComputeMeter:
    """Seconds and joules since the last ``take`` (or since it was made)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = device_description(device)
        self._nvml = _nvml_handle(torch.device(device))
        self._since, self._energy = _clock(), self._read_energy()

    def take(self) -> tuple[float, float | None]:
        now, energy = _clock(), self._read_energy()
        seconds = now - self._since
        joules = None if energy is None or self._energy is None else energy - self._energy
        self._since, self._energy = now, energy
        return seconds, joules

    def _read_energy(self) -> float | None:
        if self._nvml is None:
            return None
        import pynvml

        try:
            return pynvml.nvmlDeviceGetTotalEnergyConsumption(self._nvml) / 1000.0
        except pynvml.NVMLError:  # a board without the counter
            return None


def _nvml_handle(device: torch.device):
    if device.type != "cuda":
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetHandleByIndex(device.index if device.index is not None else torch.cuda.current_device())
    except Exception:  # noqa: BLE001 - no pynvml, no driver access: energy is simply not measured
        return None

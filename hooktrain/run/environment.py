"""What a run ran on: the versions and the device, recorded in ``config.json``."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch
import torchvision

import hooktrain


def environment_info(device: torch.device) -> dict[str, Any]:
    """The hooktrain, torch, torchvision, Python and CUDA versions and the device's name.

    ``cuda`` is the CUDA version torch was built with (None for a CPU build of torch).
    Plain strings only: the run's config goes into checkpoints, which load with
    ``weights_only=True`` and so refuse ``torch.__version__``'s own class.
    """
    return {
        "hooktrain": hooktrain.__version__,
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "device": device_name(device),
    }


def device_name(device: torch.device) -> str:
    """The GPU's name (``NVIDIA H100 80GB HBM3``) or the CPU's model, as the system tells it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return _cpu_model() or platform.machine() or "cpu"
    return device.type


def _cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (Linux), None where there is none."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return value.strip()
    return None

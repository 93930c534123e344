"""What the benchmarks record about the machine they ran on (every report prints it)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def machine_description() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) / 1024**2
    except OSError:
        pass
    import pytorch_lightning
    import torch

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "mem_gib": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pytorch_lightning": pytorch_lightning.__version__,
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }

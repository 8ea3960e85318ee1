"""This machine, as a measurement records it: host name, CPU model, the CPU features int8
kernels depend on, cores (`mpsearch calibrate` and `mpsearch verify` both say where they measured).

Imports nothing but the standard library.
"""

from __future__ import annotations

import os
import platform
import socket
from pathlib import Path
from typing import Any

__all__ = ["CPU_FEATURES", "cpu_info"]

CPU_FEATURES = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8",
                "amx_bf16", "asimd", "asimddp", "i8mm", "sve")


def cpu_info() -> dict[str, Any]:
    """This machine: host name, CPU model, the CPU features int8 kernels depend on, cores."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Processor", "CPU part") and model in ("", platform.machine(), platform.processor()):
                model = value.strip() or model
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"host": socket.gethostname(), "cpu": model, "machine": platform.machine(),
            "features": [f for f in CPU_FEATURES if f in flags], "cores": os.cpu_count()}

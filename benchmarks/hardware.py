"""The processor's name, as every benchmark records it with its results."""

from __future__ import annotations

import platform


def cpu_model() -> str:
    """The model name the CPU reports (/proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()

"""What the CPU benchmarks read from the machine: this process's peak resident set, the CPU model.

Shared by bench_linear_ce_cpu.py and bench_cpu_softmax_ce.py (imported as ``_cpu``: a script run
as ``python benchmarks/x.py`` has benchmarks/ first on ``sys.path``) and by the memory probe of
tests/torch/_torch_memory_probe.py, so the benchmark and the test measure peak memory alike.
"""

from __future__ import annotations

import platform
import resource
from pathlib import Path


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{key} not in /proc/self/status")


def reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux: clear_refs 5); return it.

    Without a reset, ru_maxrss keeps earlier peaks (imports, warm-up), which would hide a
    smaller peak measured afterwards. Falls back to ru_maxrss where /proc is unavailable.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_bytes("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss_bytes() -> int:
    """The peak resident set since the last :func:`reset_peak_rss` (VmHWM), else ru_maxrss."""
    try:
        return _status_bytes("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()

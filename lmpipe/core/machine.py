"""What machine this is, from the CPU's own description: every figure that names its machine
(the README's results table, the benchmarks) and the choice of bf16 read the same lines.

Linux `/proc/cpuinfo`; elsewhere `platform`, and no flags (callers then fall back to asking
their library).
"""

from __future__ import annotations

import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def _cpuinfo() -> list[tuple[str, str]]:
    try:
        text = CPUINFO.read_text()
    except OSError:
        return []
    return [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in text.splitlines())]


def cpu_model() -> str:
    """The CPU's marketing name ("AMD EPYC 9B14", "Intel(R) Xeon(R) ..."), else what
    `platform` knows."""
    for key, value in _cpuinfo():
        if key == "model name":
            return value
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags (x86 `flags`, arm64 `Features`); None where unknown."""
    info = _cpuinfo()
    if not info:
        return None
    return {f for key, value in info if key in ("flags", "Features") for f in value.split()}

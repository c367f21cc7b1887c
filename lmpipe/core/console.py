"""What a stage tells the person watching: one line at a time on stderr, from rank 0 only.

stdout stays free for results (`lmpipe generate` prints its text there); progress and notes
go to stderr, flushed at once so that `dvc repro` and the Prefect log show them live. Under
torchrun only rank 0 speaks, so a message is printed once, not once per process.
"""

from __future__ import annotations

import os
import resource
import sys

from tqdm import tqdm


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a plain process (RANK unset)."""
    return os.environ.get("RANK", "0") == "0"


def note(message: str) -> None:
    if is_main_process():
        print(message, file=sys.stderr, flush=True)


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def current_rss_mb() -> float:
    """This process's resident memory now, in MiB (0 where /proc is unavailable)."""
    return _status_mb("VmRSS") or 0.0


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB.

    VmHWM of /proc/self/status, not getrusage's ru_maxrss: Linux carries ru_maxrss over an
    exec, so a stage started by a large parent (dvc, pytest) would report the parent's size.
    """
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Progress:
    """A progress bar with rate and ETA on stderr (rank 0 only) for work measured in bytes
    (or `unit`); `total` may be None when the end is unknown (a streamed dataset)."""

    def __init__(self, desc: str, total: int | None = None, unit: str = "B"):
        self._bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True,
                         unit_divisor=1000, mininterval=2.0, file=sys.stderr,
                         disable=not is_main_process(), leave=True)

    def update(self, n: int) -> None:
        self._bar.update(n)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self._bar.close()

"""What a stage tells the person watching: one line at a time on stderr, from rank 0 only.

stdout stays free for results (`lmpipe generate` prints its text there); progress and notes
go to stderr, flushed at once so that `dvc repro` and the Prefect log show them live. Under
torchrun only rank 0 speaks, so a message is printed once, not once per process.
"""

from __future__ import annotations

import os
import sys


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a plain process (RANK unset)."""
    return os.environ.get("RANK", "0") == "0"


def note(message: str) -> None:
    if is_main_process():
        print(message, file=sys.stderr, flush=True)

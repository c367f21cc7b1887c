"""What a stage tells the person watching: one line at a time on stderr, from rank 0 only.

stdout stays free for results (`lmpipe generate` prints its text there); progress and notes
go to stderr, flushed at once so that `dvc repro` and the Prefect log show them live. Under
torchrun only rank 0 speaks, so a message is printed once, not once per process.
"""

from __future__ import annotations

import os
import sys
import time

from tqdm.auto import tqdm


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a plain process (RANK unset)."""
    return os.environ.get("RANK", "0") == "0"


def note(message: str) -> None:
    if is_main_process():
        print(message, file=sys.stderr, flush=True)


def _clock(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class ProgressLines:
    """tqdm's interface (update, set_postfix, close), printed as whole lines.

    A progress bar redraws one line with carriage returns; read through a pipe (`lmpipe run`
    logs every stage's output line by line, and so does Prefect's UI) those redraws arrive
    only when the stage ends, so a five-minute training stage looked silent. Off a terminal
    a training stage prints one line at most every `every_s` seconds instead: step, the
    postfix (loss, tokens/s, ...) and the time left (`left` when the caller knows it, else
    from the step rate).
    """

    def __init__(self, total: int | None, initial: int = 0, desc: str = "", every_s: float = 8.0,
                 disable: bool = False, clock=time.monotonic):
        self.total, self.n, self.desc = total, initial, desc
        self.every_s, self.disable, self.clock = every_s, disable, clock
        self.postfix: dict[str, str] = {}
        self._start = self._last = clock()
        self._start_n = initial

    def set_postfix(self, postfix: dict, refresh: bool = False) -> None:
        self.postfix = {k: str(v) for k, v in postfix.items()}

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if not self.disable and (now - self._last >= self.every_s or self.n == self.total):
            self._last = now
            note(self.line(now))

    def line(self, now: float) -> str:
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        post = dict(self.postfix)
        left = post.pop("left", None)
        if left is None and self.total:
            rate = (self.n - self._start_n) / max(now - self._start, 1e-9)
            left = _clock((self.total - self.n) / rate) if rate > 0 else None
        extra = "".join(f" {k} {v}" for k, v in post.items())
        return f"{self.desc}: step {done}{pct}{extra} ETA {left or '?'}"

    def close(self) -> None:
        pass


def progress(total: int | None, initial: int = 0, desc: str = "", disable: bool = False,
             **tqdm_kw):
    """A tqdm bar on a terminal, ProgressLines anywhere else (a pipe, a log file)."""
    if sys.stderr.isatty():
        return tqdm(total=total, initial=initial, desc=desc, disable=disable, file=sys.stderr,
                    **tqdm_kw)
    return ProgressLines(total, initial, desc, disable=disable)

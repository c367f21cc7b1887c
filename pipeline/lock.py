"""One pipeline run per checkout, and one `dvc repro` at a time inside it.

`RunLock` is held for a whole run (`lmpipe run`, a deployment's flow run, retraining): a
second run in the same checkout waits (`--wait`) or fails at once with a message naming the
holder. `repro_lock` serialises the `dvc repro` calls of one run when a parallel task runner
submits independent stages together: DVC keeps one repo lock per checkout and a second
concurrent `dvc repro` would fail on it instead of waiting.

Both are `flock` locks on files under `.lmpipe/` (git-ignored): the kernel releases them when
the holder dies, so a crashed run never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

# Paths of run locks this process holds (the CLI takes the lock before starting Prefect;
# the flow it then calls in-process must not try to take it a second time).
_HELD: dict[str, int] = {}
_HELD_GUARD = threading.Lock()


class LockHeld(RuntimeError):
    """Another run holds the checkout's lock."""

    def __init__(self, path: Path, info: dict):
        self.path = path
        self.info = info
        since = info.get("since", "an unknown time")
        who = f"pid {info.get('pid', '?')}"
        if info.get("host") and info.get("host") != socket.gethostname():
            who += f" on {info['host']}"
        what = f" (stages: {info['stages']})" if info.get("stages") else ""
        super().__init__(
            f"another lmpipe run holds {path} since {since}, {who}{what}; "
            "wait for it to finish or pass --wait [SECONDS] to queue behind it"
        )


def run_lock_path(root: str | os.PathLike) -> Path:
    return Path(root) / ".lmpipe" / "run.lock"


def read_holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


class RunLock:
    """`with RunLock(root, wait_s=0):` - exclusive per checkout; wait_s<0 waits forever."""

    def __init__(self, root: str | os.PathLike, wait_s: float = 0.0, stages=None, poll_s=0.5):
        self.path = run_lock_path(root).resolve()
        self.wait_s = wait_s
        self.stages = ",".join(stages) if stages else "all"
        self.poll_s = poll_s
        self._fd: int | None = None
        self._reentrant = False

    def acquire(self) -> "RunLock":
        key = str(self.path)
        with _HELD_GUARD:
            if key in _HELD:
                _HELD[key] += 1
                self._reentrant = True
                return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = None if self.wait_s < 0 else time.monotonic() + self.wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    info = read_holder(self.path)
                    os.close(fd)
                    raise LockHeld(self.path, info) from None
                time.sleep(self.poll_s)
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "stages": self.stages,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        with _HELD_GUARD:
            _HELD[key] = 1
        return self

    def release(self) -> None:
        key = str(self.path)
        with _HELD_GUARD:
            if self._reentrant:
                _HELD[key] -= 1
                self._reentrant = False
                return
            if self._fd is None:
                return
            _HELD.pop(key, None)
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def held_here(root: str | os.PathLike) -> bool:
    return str(run_lock_path(root).resolve()) in _HELD


@contextlib.contextmanager
def repro_lock(root: str | os.PathLike) -> Iterator[None]:
    """Serialise `dvc repro` calls on one checkout (threads and processes alike).

    flock locks belong to an open file description, so two threads that each open the file
    exclude each other as two processes do.
    """
    path = Path(root) / ".lmpipe" / "repro.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

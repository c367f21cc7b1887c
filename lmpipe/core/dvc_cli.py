"""Running `dvc` itself: its command line is DVC's stable interface (STACK-NOTES).

The `dvc` beside the running interpreter (the project's venv) is preferred over the one on
PATH, and the stages it launches must find that same interpreter, so its folder goes first
on PATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil


def dvc_bin() -> str:
    """The `dvc` beside the running interpreter, else the one on PATH."""
    beside = Path(sys.executable).with_name("dvc")
    if beside.exists():
        return str(beside)
    return shutil.which("dvc") or "dvc"


def dvc_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("DVC_NO_ANALYTICS", "1")
    bindir = str(Path(sys.executable).parent)
    if bindir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    if extra:
        env.update(extra)
    return env


def run_dvc(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`dvc ARGS` in `root`, output captured; raises RuntimeError naming the command when it
    fails and `check` is set."""
    proc = subprocess.run([dvc_bin(), *args], cwd=root, env=dvc_env(), capture_output=True,
                          text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed ({proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()}")
    return proc


def cache_dir(root: Path) -> Path:
    """The DVC cache of the repo at `root` (`dvc cache dir`: `.dvc/cache` unless configured)."""
    return Path(run_dvc(root, "cache", "dir").stdout.strip())


def cache_file(root: Path, md5: str) -> Path:
    """Where DVC 3 keeps the bytes of a file whose md5 is `md5` (`files/md5/ab/cdef...`)."""
    return cache_dir(root) / "files" / "md5" / md5[:2] / md5[2:]


def dvc_ancestor() -> psutil.Process | None:
    """The `dvc` process (repro, exp run, exp exec-run) that started this one, if any.

    DVC runs a stage command through the shell, so it is the parent or a near ancestor.
    """
    try:
        for proc in psutil.Process().parents():
            argv = proc.cmdline()
            if any(Path(a).name == "dvc" for a in argv[:2]) or argv[1:3] == ["-m", "dvc"]:
                return proc
    except (psutil.Error, OSError):
        return None
    return None


def execution_id(proc: psutil.Process) -> str:
    """Names one execution of `dvc repro` / `dvc exp run`: the host, the dvc process and its
    start time (a pid alone is reused)."""
    return f"{os.uname().nodename}:{proc.pid}:{int(proc.create_time() * 1000)}"

"""The git state a run records: the commit, and whether the working tree differed from it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from lmpipe.core.paths import project_root


def git(root: Path, *args: str, env: dict[str, str] | None = None, check: bool = False) -> str:
    """stdout of `git ARGS` in `root` (`env` added to the environment). When git fails:
    '' , or RuntimeError naming the command when `check` is set."""
    try:
        proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              timeout=60, env={**os.environ, **(env or {})})
    except (OSError, subprocess.SubprocessError) as err:
        if check:
            raise RuntimeError(f"git {' '.join(args)} failed: {err}") from None
        return ""
    if proc.returncode != 0:
        if check:
            raise RuntimeError(f"git {' '.join(args)} failed: {proc.stderr.strip()}")
        return ""
    return proc.stdout.strip()


def git_state(root: Path | None = None) -> dict[str, str]:
    """`git_commit` and `git_dirty` (tracked files changed) of the checkout; 'unknown' outside git."""
    root = root or project_root()
    commit = git(root, "rev-parse", "HEAD")
    if not commit:
        return {"git_commit": "unknown", "git_dirty": "unknown"}
    dirty = bool(git(root, "status", "--porcelain", "--untracked-files=no"))
    return {"git_commit": commit, "git_dirty": str(dirty).lower()}

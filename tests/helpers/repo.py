"""A scratch git + DVC copy of the project, for tests that drive `dvc` and `lmpipe` like a user."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from lmpipe.core.profiles import dump_params, profile_dict

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PROJECT_FILES = [
    "dvc.yaml", "stages", "lmpipe", "pipeline", "profiles", "pyproject.toml", "Makefile",
    ".gitignore", ".dvcignore", "prefect.yaml", "README.md",
]


def repo_env(root: Path, mirror: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LMPIPE_", "MLFLOW_TRACKING"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        LMPIPE_MIRROR=str(mirror),
        MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}",
        DVC_NO_ANALYTICS="1",
    )
    env.pop("PYTHONHASHSEED", None)   # every process draws its own hash seed, as a user's does
    return env


def make_repo(root: Path, mirror: Path, profile: str = "smoke") -> dict[str, str]:
    """Copy the project into `root`, write the profile's params, `git init` + `dvc init`."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in PROJECT_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=ignore)
        elif src.exists():
            shutil.copy2(src, root / name)
    (root / "params.yaml").write_text(dump_params(profile_dict(profile)))
    env = repo_env(root, mirror)
    run(["git", "init", "-q", "-b", "main"], root, env)
    run(["git", "config", "user.email", "test@lmpipe.invalid"], root, env)
    run(["git", "config", "user.name", "lmpipe test"], root, env)
    run(["dvc", "init", "-q"], root, env)
    run(["dvc", "config", "core.autostage", "true"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-q", "-m", "init"], root, env)
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str], check: bool = True, timeout: int = 900):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
            f"--- stderr\n{proc.stderr[-4000:]}"
        )
    return proc


def ran_stages(dvc_output: str) -> list[str]:
    """Stage names that `dvc repro` actually executed (not restored, not skipped)."""
    out = []
    for line in dvc_output.splitlines():
        line = line.strip()
        if line.startswith("Running stage '"):
            out.append(line.split("'")[1])
    return out

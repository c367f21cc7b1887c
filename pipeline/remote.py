"""Remote storage for a team: a DVC remote (S3 or any DVC URL) and git commits of dvc.lock.

Configuration, environment first, then params.yaml (`pipeline:`):

| what | environment | params |
|---|---|---|
| DVC remote URL | `LMPIPE_DVC_REMOTE` (e.g. `s3://bucket/lmpipe`) | `pipeline.dvc_remote` |
| S3 endpoint (MinIO, moto, ...) | `LMPIPE_S3_ENDPOINT_URL`, else `AWS_ENDPOINT_URL` | - |
| credentials | `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` (or a profile) | - |

The remote is written to `.dvc/config.local` (never committed: endpoints and credentials are
per machine) as the default remote named `lmpipe`. A remote already configured in
`.dvc/config` is used as it is.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

from lmpipe.core.dvc_cli import run_dvc as _dvc
from lmpipe.core.git import git
from lmpipe.core.records import read_lock

REMOTE_NAME = "lmpipe"


def remote_url(params_remote: str | None = None) -> str | None:
    return os.environ.get("LMPIPE_DVC_REMOTE") or params_remote or None


def s3_endpoint() -> str | None:
    return os.environ.get("LMPIPE_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")


def configure_dvc_remote(root: Path, url: str, name: str = REMOTE_NAME) -> str:
    """Make `url` the default DVC remote of this checkout (local config); returns its name."""
    _dvc(root, "remote", "add", "--local", "--force", "--default", name, url)
    endpoint = s3_endpoint()
    if url.startswith("s3://") and endpoint:
        _dvc(root, "remote", "modify", "--local", name, "endpointurl", endpoint)
    return name


def default_remote(root: Path) -> str | None:
    proc = _dvc(root, "remote", "default", check=False)
    name = proc.stdout.strip()
    return name if proc.returncode == 0 and name else None


def ensure_remote(root: Path, params_remote: str | None = None) -> str | None:
    """The remote to push to: the configured URL (env/params), else the repo's default."""
    url = remote_url(params_remote)
    if url:
        return configure_dvc_remote(root, url)
    return default_remote(root)


def dvc_push(root: Path, params_remote: str | None = None) -> str:
    remote = ensure_remote(root, params_remote)
    if not remote:
        return "dvc push skipped: no DVC remote configured (LMPIPE_DVC_REMOTE or " \
               "pipeline.dvc_remote)"
    proc = _dvc(root, "push", "-r", remote, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"dvc push to {remote} failed: {(proc.stderr or proc.stdout)[-2000:]}")
    last = (proc.stdout.strip().splitlines() or ["done"])[-1]
    return f"dvc push to {remote}: {last}"


def commit_to_branch(root: Path, branch: str, paths: list[str], message: str) -> str:
    """Commit `paths` as they are on disk onto `branch`, without touching the checkout.

    The commit is built in a temporary index on top of the branch tip (or HEAD when the
    branch does not exist yet): the user's index, working tree and current branch stay as
    they are. When `branch` is the checked-out branch, it is an ordinary `git commit`.
    """
    root = Path(root)

    def must(*args: str, env: dict[str, str] | None = None) -> str:
        return git(root, *args, env=env, check=True)

    if git(root, "rev-parse", "--is-inside-work-tree") != "true":
        return f"commit skipped: {root} is not a git checkout"
    paths = [p for p in paths if (root / p).exists()]
    if not paths:
        return "commit skipped: nothing to commit"
    current = git(root, "symbolic-ref", "--quiet", "--short", "HEAD")
    if current == branch:
        must("add", "--", *paths)
        if not must("diff", "--cached", "--name-only", "--", *paths):
            return f"commit skipped: {', '.join(paths)} unchanged on {branch}"
        must("commit", "-q", "-m", message, "--", *paths)
        return f"committed {', '.join(paths)} to {branch} ({must('rev-parse', 'HEAD')[:12]})"
    parent = git(root, "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}") \
        or must("rev-parse", "HEAD")
    with tempfile.TemporaryDirectory() as tmp:
        env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
        must("read-tree", parent, env=env)
        must("add", "-f", "--", *paths, env=env)
        tree = must("write-tree", env=env)
    if tree == must("rev-parse", f"{parent}^{{tree}}"):
        return f"commit skipped: {', '.join(paths)} unchanged on {branch}"
    commit = must("commit-tree", tree, "-p", parent, "-m", message)
    must("update-ref", f"refs/heads/{branch}", commit)
    return f"committed {', '.join(paths)} to branch {branch} ({commit[:12]})"


def git_tracked_outs(root: Path) -> list[str]:
    """dvc.lock and the outs DVC leaves to git (`cache: false`: metrics, small plots).

    DVC writes a .gitignore entry for every cached out; what is not ignored belongs in the
    commit that records dvc.lock, or a checkout of that commit would not match it.
    """
    lock = read_lock(root, required=False)
    outs = sorted({o["path"] for e in lock.values()
                   for o in e.get("outs") or [] if (root / o["path"]).exists()})
    if not outs:
        return ["dvc.lock"]
    proc = subprocess.run(["git", "check-ignore", "--no-index", "--", *outs], cwd=root,
                          capture_output=True, text=True)
    ignored = set(proc.stdout.split())
    return ["dvc.lock"] + [o for o in outs if o not in ignored]

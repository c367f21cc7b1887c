"""The flow a sweep point runs on a Prefect worker: one DVC experiment, pushed.

`lmpipe sweep` (pipeline/sweep.py) deploys this flow once per sweep with a `git_clone` pull
step at the sweep's commit. The worker takes a flow run, makes a fresh temporary folder (the
process worker's, under its TMPDIR), Prefect clones the git remote there and checks out the
commit, and this flow runs in that clone: a clean workspace per run, never anyone's working
tree. Then:

1. the clone is checked (the sweep's commit, nothing modified); the DVC remote comes from
   the worker's environment (LMPIPE_DVC_REMOTE, pipeline/remote.py) or the committed
   default, and `dvc exp run` gets a git identity for the experiment's commit;
2. with a base (the stages every point shares): `dvc exp pull origin BASE` and `dvc exp
   apply BASE` bring the shared stages' dvc.lock entries and outs;
3. `dvc exp run --pull -n POINT -S ... [stages]`: `--pull` fetches from the DVC remote (and
   its run cache) what a stage needs that is computed already, so only the stages the
   point's params change run. Each stage's MLflow run is a child of the point's run;
4. `dvc exp push --force --run-cache origin POINT`: the experiment to the git remote, its
   outs and run cache to the DVC remote (`--force`: a retried point replaces what a dead
   attempt may have pushed under the same name);
5. the point's MLflow run (created by `lmpipe sweep`) gets dvc.lock, every metrics file and
   their numbers, and the experiment's name and commit.

A stage that exits 2 (bad params or input) fails the point with PointInputError, which
`lmpipe sweep` never retries. Anything else is PointFailed, and the sweep reschedules the
flow run (any worker may take it), as it does when a worker dies (no heartbeat: Crashed).
"""

from __future__ import annotations

import collections
import os
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from lmpipe.core.dvc_cli import dvc_bin, dvc_env
from lmpipe.core.errors import EXIT_BAD_INPUT
from lmpipe.core.git import git
from lmpipe.core.metric_logger import MLflowLogger, NullLogger
from lmpipe.core.names import PARENT_RUN_ENV
from lmpipe.tracking.pipeline_run import finish_pipeline_run
from lmpipe.tracking.sweep import EXP_REV_TAG, begin_attempt, fail_run, mlflow_client
from pipeline.flow import run_logger
from pipeline.remote import ensure_remote

POINT_FLOW = "lmpipe-sweep-point"
ENTRYPOINT = "pipeline/sweep_point.py:lmpipe_sweep_point"
_EXITED = re.compile(r"exited with (-?\d+)")


class PointFailed(RuntimeError):
    """The point did not finish. `lmpipe sweep` retries it (another attempt, any worker)."""

    retryable = True

    def __init__(self, point: str, message: str, exit_code: int | None = None):
        self.point, self.detail, self.exit_code = point, message, exit_code
        super().__init__(f"sweep point {point}: {message}")

    def __reduce__(self):
        return (type(self), (self.point, self.detail, self.exit_code))


class PointInputError(PointFailed):
    """A stage exited 2: the point's params or input are bad. Never retried."""

    retryable = False


# ----------------------------------------------------------------------------- commands
def stream(cmd: list[str], root: Path, env: dict[str, str], tail_lines: int = 40,
           echo=None) -> tuple[int, str]:
    """Run `cmd` in `root`, each output line to `echo`; (exit code, the last lines)."""
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    for raw in proc.stdout:
        # progress bars rewrite their line with \r: keep what a terminal would show
        line = raw.decode("utf-8", errors="replace").rstrip("\n").rsplit("\r", 1)[-1]
        tail.append(line)
        if echo is not None:
            echo(line)
    return proc.wait(), "\n".join(tail)


def dvc(root: Path, point: str, *args: str, env: dict[str, str] | None = None) -> str:
    """`dvc ARGS` in the workspace, streamed to the flow's log; PointFailed when it fails."""
    logger = run_logger()
    logger.info("$ dvc %s", " ".join(args))
    code, tail = stream([dvc_bin(), *args], root, env or dvc_env(),
                        echo=lambda line: logger.info("[%s] %s", point, line))
    if code != 0:
        tail = tail.replace(f"{root}/", "")  # paths inside this throwaway clone, relative
        found = _EXITED.findall(tail)
        stage_code = int(found[-1]) if found else None
        what = f"dvc {args[0]} {args[1] if len(args) > 1 else ''}".strip()
        # the stage's own message (`stage NAME: error: key.path: ...`) leads, when it has one
        said = [line for line in tail.splitlines() if re.match(r"stage \S+: error: ", line)]
        head = f"{said[-1]} (`{what}`" if said else f"`{what}` exited {code} ("
        if stage_code == EXIT_BAD_INPUT:
            raise PointInputError(point, f"{head}, exit {EXIT_BAD_INPUT}: bad params or input)"
                                  f"\n{tail}", EXIT_BAD_INPUT)
        raise PointFailed(point, f"{head}" + (f", a stage exited {stage_code})" if found
                                              else ")") + f"\n{tail}", stage_code)
    return tail


# ----------------------------------------------------------------------------- the steps
@task(name="prepare-workspace", cache_policy=NO_CACHE)
def prepare_workspace(root: str, point: str, commit: str) -> str:
    """Check the clone is the sweep's commit, unmodified; DVC remote; git identity."""
    path = Path(root)
    head = git(path, "rev-parse", "HEAD")
    if head != commit:
        raise PointFailed(point, f"{root} is at {head or 'no commit'}, not the sweep's commit "
                          f"{commit}: this flow runs in the clone its deployment's git_clone "
                          "step makes")
    changed = git(path, "status", "--porcelain", "--untracked-files=no")
    if changed:
        raise PointFailed(point, f"{root} has modified files, refusing to run there:\n{changed}")
    for key, env_key, default in (("user.name", "GIT_AUTHOR_NAME", "lmpipe sweep"),
                                  ("user.email", "GIT_AUTHOR_EMAIL", "lmpipe-sweep@localhost")):
        if not git(path, "config", key):
            git(path, "config", key, os.environ.get(env_key) or default, check=True)
    remote = ensure_remote(path)
    if not remote:
        raise PointFailed(point, "no DVC remote on this worker: set LMPIPE_DVC_REMOTE (and "
                          "LMPIPE_S3_ENDPOINT_URL for non-AWS S3) where the worker starts, or "
                          "commit a default remote")
    return remote


def exp_rev(root: Path, name: str) -> str:
    """The commit of experiment `name` in this clone ('' when it has none)."""
    refs = git(root, "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps")
    revs = [line.split()[0] for line in refs.splitlines() if line.endswith(f"/{name}")]
    return revs[0] if revs else ""


@task(name="apply-base", cache_policy=NO_CACHE)
def apply_base(root: str, point: str, base: str, git_remote: str) -> None:
    """The shared stages' dvc.lock entries (the base experiment's files) into this workspace;
    their outs come into the cache with the experiment, and into the workspace with `dvc exp
    run --pull`. Not `dvc exp apply`: it fails on every out of dvc.lock missing from the
    cache, including stages this sweep never runs."""
    path = Path(root)
    dvc(path, point, "exp", "pull", "--force", git_remote, base)
    rev = exp_rev(path, base)
    if not rev:
        raise PointFailed(point, f"experiment {base} not found after `dvc exp pull "
                          f"{git_remote} {base}`")
    git(path, "checkout", rev, "--", ".", check=True)


@task(name="dvc-exp-run", cache_policy=NO_CACHE)
def exp_run(root: str, point: str, overrides: list[str], targets: list[str] | None,
            parent_run_id: str | None) -> float:
    """`dvc exp run --pull`: only what the point's params change runs."""
    extra = {"LMPIPE_ROOT": root, "PYTHONUNBUFFERED": "1"}
    if parent_run_id:
        extra[PARENT_RUN_ENV] = parent_run_id
    env = dvc_env(extra)
    env.pop("LMPIPE_PARAMS", None)  # the stages must read this workspace's params.yaml
    if not parent_run_id:
        env.pop(PARENT_RUN_ENV, None)
    args = ["exp", "run", "--pull", "-n", point]
    for o in overrides:
        args += ["-S", o]
    started = time.monotonic()
    dvc(Path(root), point, *args, *(targets or []), env=env)
    return round(time.monotonic() - started, 3)


@task(name="dvc-exp-push", cache_policy=NO_CACHE)
def exp_push(root: str, point: str, git_remote: str, attempts: int = 3) -> str:
    """The experiment to the git remote, its outs and run cache to the DVC remote."""
    for attempt in range(1, attempts + 1):
        try:
            dvc(Path(root), point, "exp", "push", "--force", "--run-cache", git_remote, point)
            break
        except PointFailed:
            if attempt == attempts:
                raise
            time.sleep(5 * 4 ** (attempt - 1))  # 5 s, 20 s: a remote that hiccups
    return exp_rev(Path(root), point)


# ----------------------------------------------------------------------------- tracking
def _tracking(run_id: str | None, point: str):
    """(logger, client) for the point's MLflow run; no-ops when tracking is off."""
    if not run_id or os.environ.get("LMPIPE_TRACKING", "").lower() in ("off", "0", "false"):
        return NullLogger(), None
    log = MLflowLogger(point, attach=run_id)
    try:
        client = mlflow_client()
        closed = begin_attempt(client, run_id, {"prefect.flow_run_id": _flow_run_id(),
                                                "lmpipe.worker_host": socket.gethostname()})
        if closed:
            run_logger().info("closed %d stage run(s) a dead attempt left RUNNING", closed)
    except Exception as err:  # tracking never fails the work
        run_logger().warning("MLflow: could not mark run %s running: %s", run_id, err)
        client = None
    return log, client


def _flow_run_id() -> str:
    try:
        from prefect.runtime import flow_run  # deferred: only meaningful inside a flow run

        return str(flow_run.id or "none")
    except Exception:  # pragma: no cover
        return "none"


def run_point(root: Path, sweep: str, point: str, commit: str, overrides: list[str],
              targets: list[str] | None, base: str | None, mlflow_run_id: str | None,
              git_remote: str) -> dict[str, Any]:
    log, client = _tracking(mlflow_run_id, point)
    try:
        prepare_workspace(str(root), point, commit)
        if base:
            apply_base(str(root), point, base, git_remote)
        seconds = exp_run(str(root), point, overrides, targets, mlflow_run_id)
        rev = exp_push(str(root), point, git_remote)
    except PointFailed as err:
        if client is not None:
            try:
                fail_run(client, mlflow_run_id, err.exit_code, err.detail)
            except Exception as log_err:  # tracking never hides the real failure
                run_logger().warning("MLflow: could not record the failure: %s", log_err)
        raise
    markdown, lock = finish_pipeline_run(log, root)
    log.set_tags({EXP_REV_TAG: rev, "dvc_lock_md5": lock, "lmpipe.exp_run_seconds": seconds})
    log.close("FINISHED")
    return {"sweep": sweep, "point": point, "experiment": point, "rev": rev,
            "seconds": seconds, "markdown": markdown}


@flow(name=POINT_FLOW, log_prints=True, validate_parameters=True)
def lmpipe_sweep_point(
    sweep: str,
    point: str,
    commit: str,
    overrides: list[str] | None = None,
    targets: list[str] | None = None,
    base: str | None = None,
    mlflow_run_id: str | None = None,
    git_remote: str = "origin",
) -> dict:
    """Run one point of sweep `sweep` as DVC experiment `point` (`dvc exp run -S overrides`)
    in this clone of the sweep's `commit`, starting from experiment `base` when given; push
    it to `git_remote` and the DVC remote; log it to MLflow run `mlflow_run_id`."""
    return run_point(Path.cwd(), sweep, point, commit, overrides or [], targets, base,
                     mlflow_run_id, git_remote)

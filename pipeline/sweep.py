"""`lmpipe sweep`: a grid of params as DVC experiments on a Prefect work pool, one MLflow
parent run over them.

    lmpipe sweep -S pretrain.train.lr=0.003,0.006 -S pretrain.model.n_layer=2,4 --pool gpu
    lmpipe sweep -S pretrain.train.lr=0.003,0.006 --local 2

1. The sweep runs a commit, never a working tree: HEAD of the checkout, with no tracked file
   modified, and (on a work pool) already on the git remote the workers clone from.
2. Its points and the stages they share come from pipeline/sweep_plan.py; a point whose
   overrides cannot apply is bad input (exit 2 for it alone) and is not submitted.
3. One MLflow parent run; a child per point (and one for the base), created here so that a
   retried point keeps its run (lmpipe/tracking/sweep.py).
4. Prefect runs the base, then the points, and retries what crashes
   (pipeline/sweep_submit.py); with `local=N`, on N workers started here
   (pipeline/local_pool.py).
5. At the end the report (the table, and a PNG of the target against each swept param) is
   printed, written to .lmpipe/sweeps/NAME/ and logged to the parent run.

Exit code: 0 when every point finished; 2 when the only failures are bad points; else 1.
"""

from __future__ import annotations

import contextlib
import subprocess
from dataclasses import dataclass
from pathlib import Path

from prefect import get_client
from prefect.settings import PREFECT_API_URL

from lmpipe.core.console import note
from lmpipe.core.errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, InputError
from lmpipe.core.git import git
from lmpipe.core.params import tracking_experiment
from lmpipe.tracking import sweep as tracking
from pipeline.local_pool import local_workers
from pipeline.sweep_plan import SweepPlan, plan_sweep
from pipeline.sweep_point import POINT_FLOW
from pipeline.sweep_submit import Tracked, check_pool, crash_automation, deploy, run_points


@dataclass
class SweepOptions:
    name: str
    set_args: list[str]
    params_file: str | None = None
    stages: list[str] | None = None
    pool: str | None = None           # default: `gpu`; with `local`, `lmpipe-local`
    git_remote: str | None = None     # default: `origin`; with `local`, the checkout itself
    local: int | None = None          # N local process workers instead of a remote pool
    retries: int = 2
    crash_after: float | None = None  # default: 90 s with `local`, else 600 s
    target: str | None = None
    maximize: bool = False
    dry_run: bool = False


# ----------------------------------------------------------------------------- git
def sweep_commit(root: Path) -> str:
    """HEAD, when no tracked file differs from it (the sweep runs the commit, not the tree)."""
    commit = git(root, "rev-parse", "HEAD")
    if not commit:
        raise InputError(f"{root}: not a git checkout with a commit; a sweep runs a commit")
    changed = git(root, "status", "--porcelain", "--untracked-files=no")
    if changed:
        files = ", ".join(line.split(maxsplit=1)[-1] for line in changed.splitlines()[:8])
        raise InputError(f"the sweep runs commit {commit[:12]}, but tracked files differ from "
                         f"it ({files}); commit them (and push) or stash them first")
    return commit


def git_remote_url(root: Path, remote: str) -> str:
    """The URL of git remote `remote` (a name of this checkout), or `remote` itself."""
    url = git(root, "remote", "get-url", remote)
    if url:
        return url
    if Path(remote).expanduser().exists():
        return str(Path(remote).expanduser().resolve())
    if "://" in remote or "@" in remote:
        return remote
    raise InputError(f"--git-remote: {remote!r} is neither a git remote of {root} nor a URL "
                     "or path; add it with `git remote add NAME URL`")


def check_on_remote(root: Path, remote: str, url: str, commit: str) -> None:
    """The workers clone `url`: the commit must be on one of its branches or tags."""
    if git(root, "remote", "get-url", remote):
        git(root, "fetch", "--quiet", "--tags", remote)  # the tips the workers will see
    for line in git(root, "ls-remote", "--heads", "--tags", url).splitlines():
        tip = line.split()[0]
        if tip == commit or subprocess.run(
                ["git", "merge-base", "--is-ancestor", commit, tip], cwd=root,
                capture_output=True).returncode == 0:
            return
    raise InputError(f"commit {commit[:12]} is not on git remote {remote} ({url}); the workers "
                     f"clone it from there: push it first (`git push {remote} HEAD`)")


# ----------------------------------------------------------------------------- the sweep
def describe(plan: SweepPlan, target: str, url: str) -> str:
    lines = [f"sweep {plan.name}: commit {plan.commit[:12]} of {url}, {len(plan.points)} "
             f"point(s), target {target}"]
    for p in plan.points:
        lines.append(f"  {p.name}  {' '.join(p.overrides)}"
                     + (f"  BAD (exit 2): {p.error}" if p.error else ""))
    if plan.base:
        lines.append(f"  base {plan.base} runs once: {', '.join(plan.shared)}")
    lines.append(f"  every point runs: {', '.join(plan.affected)}")
    return "\n".join(lines)


def open_tracking(root: Path, plan: SweepPlan, opts: SweepOptions, target: str, url: str):
    client = tracking.mlflow_client()
    runs = tracking.open_sweep(client, tracking_experiment(root), plan.name, {
        "sweep.set": " ".join(opts.set_args) or "none",
        "sweep.params_file": opts.params_file or "none", "sweep.points": len(plan.points),
        "sweep.stages": ",".join(plan.stages), "sweep.shared": ",".join(plan.shared) or "none",
    }, {tracking.TARGET_TAG: target, tracking.MAXIMIZE_TAG: str(opts.maximize).lower(),
        tracking.GIT_REMOTE_TAG: url, "git_commit": plan.commit,
        "lmpipe.work_pool": opts.pool or ""})
    if plan.base:
        tracking.add_child(client, runs, plan.base, "base", {}, {})
    for p in plan.points:
        tracking.add_child(client, runs, p.name, "point", p.values, {}, p.error)
    note(f"sweep {plan.name}: MLflow parent run {runs.sweep_run_id}")
    return client, runs


def close_tracking(client, plan: SweepPlan, runs, tracked: list[Tracked]) -> int:
    """Close what no flow run closed; the sweep's exit code."""
    ended = {t.point: t for t in tracked}
    for name, run_id in runs.children.items():
        t = ended.get(name)
        if t is not None and t.outcome == "done":
            continue
        run = client.get_run(run_id)
        if run.info.status in ("RUNNING", "SCHEDULED"):
            why = (t.message if t is not None else "not run: the base did not finish, or "
                   "the sweep was interrupted") or "did not finish"
            tracking.fail_run(client, run_id, None, why,
                              "KILLED" if "interrupted" in why else "FAILED")
    bad = [p for p in plan.points if p.error] + [t for t in tracked if t.outcome == "bad-input"]
    failed = [t for t in tracked if t.outcome == "failed"]
    if plan.base and (not tracked or tracked[0].outcome != "done"):
        failed.append(plan.base)
    client.set_tag(runs.sweep_run_id, "lmpipe.outcome",
                   f"{sum(t.outcome == 'done' for t in tracked if t.point != plan.base)} done, "
                   f"{len(bad)} bad, {len(failed)} failed")
    client.set_terminated(runs.sweep_run_id, "FAILED" if bad or failed else "FINISHED")
    return EXIT_FAILURE if failed else EXIT_BAD_INPUT if bad else EXIT_OK


def run_sweep(root: Path, opts: SweepOptions) -> int:
    commit = sweep_commit(root)
    remote = opts.git_remote or ("origin" if not opts.local else str(root))
    url = git_remote_url(root, remote)
    plan = plan_sweep(root, opts.name, commit, opts.set_args, opts.params_file, opts.stages)
    opts.pool = opts.pool or ("lmpipe-local" if opts.local else "gpu")
    target = opts.target or tracking.default_target(plan.keys, plan.stages)
    if target is None:
        raise InputError("--target: the points run neither evaluate nor the stage that trains "
                         "the swept model; name the metric to sort by, STAGE.KEY of "
                         "metrics/STAGE.json (e.g. tokenizer.val_bytes_per_token)")
    note(describe(plan, target, url))
    if opts.dry_run:
        return EXIT_BAD_INPUT if len(plan.good) < len(plan.points) else EXIT_OK
    if not plan.good:
        raise InputError("no point of the sweep can run (see BAD above)")
    if not opts.local:
        if not PREFECT_API_URL.value():
            raise InputError("no Prefect API: set PREFECT_API_URL to the server the workers "
                             "use (or run on this machine with --local N)")
        check_on_remote(root, remote, url, commit)
        with get_client(sync_client=True) as prefect:  # before anything is recorded
            check_pool(prefect, opts.pool)
    crash_after = opts.crash_after or (90.0 if opts.local else 600.0)
    client, runs = open_tracking(root, plan, opts, target, url)
    tracked: list[Tracked] = []
    pool = opts.pool
    local = local_workers(root, plan.name, opts.local, pool) if opts.local \
        else contextlib.nullcontext()
    try:
        with local, get_client(sync_client=True) as prefect:
            deployment = deploy(prefect, plan, pool, url)
            automation = crash_automation(prefect, deployment, plan.name, crash_after)
            try:
                run_points(prefect, plan, runs, f"{POINT_FLOW}/{plan.name}", opts.retries,
                           tracked)
            finally:
                with contextlib.suppress(Exception):
                    prefect.delete_automation(automation)
    finally:
        code = close_tracking(client, plan, runs, tracked)
    out_dir = root / ".lmpipe" / "sweeps" / plan.name
    _, markdown, png = tracking.sweep_report(client, tracking_experiment(root), plan.name,
                                             out_dir=out_dir)
    print(markdown)
    if png:
        print(f"figure: {png}")
    print(f"MLflow parent run: {runs.sweep_run_id}; `lmpipe sweep report {plan.name}` prints "
          f"this again, `lmpipe sweep apply {plan.name}` puts the best point in your workspace")
    return code

"""`lmpipe run`: the Prefect flow over the DVC stages (what `make run` calls)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lmpipe.cli import profile as profile_cmd
from lmpipe.core.errors import EXIT_BAD_INPUT, EXIT_FAILURE, InputError
from lmpipe.core.paths import project_root

EPILOG = """\
examples:
  lmpipe run                                 # every stage in dvc.yaml that DVC finds stale
  lmpipe run --stages pretrain,evaluate      # those two and everything upstream of them
  lmpipe run --profile smoke                 # switch params.yaml to a profile, then run
  lmpipe run --force download                # re-check the source even if DVC skips it
  lmpipe run --wait                          # queue behind another run of this checkout
  lmpipe run --retrain                       # the scheduled retraining flow, by hand
  lmpipe run --dry-run                       # print the stage order, run nothing

Without PREFECT_API_URL the flow runs on Prefect's temporary local server (state in
.prefect/ unless PREFECT_HOME is set); with it, the run shows in that server's UI.
"""


def _csv(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def register(sub) -> None:
    p = sub.add_parser(
        "run",
        help="run the pipeline (all DVC stages, or a subset with its upstream) as a Prefect flow",
        description="Run the DVC stages as one Prefect flow under an MLflow parent run. DVC "
        "decides which stages are stale; the flow adds retries, one run per checkout, and a "
        "metrics table at the end.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--stages", type=_csv, default=None,
                   help="comma-separated stages to run (their upstream stages run too)")
    p.add_argument("--force", type=_csv, default=None,
                   help="comma-separated stages to re-run even when up to date")
    p.add_argument("--profile", default=None,
                   help="write this params profile to params.yaml first (see `lmpipe profile`)")
    p.add_argument("--wait", nargs="?", type=float, const=-1.0, default=None, metavar="SECONDS",
                   help="wait for another run of this checkout to finish (forever, or SECONDS)")
    p.add_argument("--task-runner", choices=["sequential", "thread", "dask", "ray"],
                   default=None, help="how stage tasks are submitted (default: "
                   "pipeline.task_runner). One checkout still runs one `dvc repro` at a time")
    p.add_argument("--retrain", action="store_true",
                   help="run the retraining flow: re-check the source, repro, evaluate, "
                   "promote, push, commit dvc.lock (pipeline/retrain.py)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the stages that would be run, upstream first, and exit")
    p.set_defaults(func=run)


def prefect_environment(root: Path) -> None:
    """Defaults that make the embedded (serverless) run work out of the box.

    Must run before prefect is imported: Prefect reads its settings at import.
    """
    os.environ.setdefault("PREFECT_HOME", str(root / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    # The temporary server is local: no telemetry (offline it only logs errors).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")


def use_checkout(root: Path) -> None:
    """Make the checkout's `pipeline` package importable.

    `pipeline/` (like `stages/`) belongs to the checkout, not to the installed library: it is
    versioned with the dvc.yaml it runs, so a worktree at another commit runs its own flow.
    """
    if not (root / "pipeline" / "__init__.py").is_file():
        raise InputError(f"{root}: not an lmpipe checkout (no pipeline/ package here); run "
                         "`lmpipe run` inside the project")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))


def run(args) -> int:
    root = project_root()
    if args.profile:
        profile_cmd.run(argparse.Namespace(name=args.profile, output=None, print=False))
    use_checkout(root)
    # Deferred until the checkout is on sys.path and Prefect's environment is set: Prefect
    # reads its settings when it is imported.
    from pipeline.graph import read_stage_graph

    # Names are checked before Prefect starts: a typo costs a second, not a server start.
    graph = read_stage_graph(root)
    order = graph.resolve(args.stages)
    if args.force:
        graph.resolve(args.force)
    if args.dry_run:
        if not order:
            print(f"dvc.yaml in {root} declares no stages")
        for stage in order:
            ups = sorted(graph.upstream.get(stage, set()))
            print(f"{stage}" + (f"  (after {', '.join(ups)})" if ups else ""))
        return 0

    from pipeline.lock import LockHeld, RunLock

    prefect_environment(root)
    lock_wait = args.wait
    try:
        # Taken before Prefect starts (its temporary server costs seconds): a busy checkout
        # is reported at once. The flow re-enters the same lock in this process.
        with RunLock(root, wait_s=lock_wait if lock_wait is not None else 0.0,
                     stages=args.stages):
            return _run_flow(args, root)
    except LockHeld as err:
        print(f"lmpipe run: {err}", file=sys.stderr)
        return 1


def _run_flow(args, root: Path) -> int:
    # deferred: Prefect reads its settings when imported (prefect_environment sets them)
    from pipeline.flow import PipelineFailed

    try:
        if args.retrain:
            from pipeline.retrain import lmpipe_retrain

            report = lmpipe_retrain(stages=args.stages, root=str(root),
                                    task_runner=args.task_runner)
            pipe = report["pipeline"]
        else:
            from pipeline.flow import lmpipe_pipeline

            pipe = lmpipe_pipeline(stages=args.stages, force=args.force, root=str(root),
                                   task_runner=args.task_runner)
            report = None
    except PipelineFailed as err:
        print(f"lmpipe run: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT if err.bad_input else EXIT_FAILURE
    print()
    print(pipe["markdown"], end="")
    if pipe.get("parent_run_id"):
        print(f"\nMLflow parent run: {pipe['parent_run_id']} (`lmpipe ui` to browse)")
    print("dvc.lock records this run: `git add dvc.lock metrics plots && git commit` keeps it "
          "(or `dvc config core.autostage true` to stage it automatically)")
    if report:
        for line in report.get("summary", []):
            print(line)
    return 0

"""`lmpipe sweep`: a parameter sweep as DVC experiments on Prefect workers; its report; the
best point applied to the workspace (pipeline/sweep.py, lmpipe/tracking/sweep.py)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from lmpipe.core.errors import InputError
from lmpipe.core.paths import project_root

EPILOG = """\
examples:
  lmpipe sweep -S pretrain.train.lr=0.003,0.006 -S pretrain.model.n_layer=2,4 --local 2
  lmpipe sweep -S pretrain.train.lr=0.003,0.006 --pool gpu     # workers on other machines
  lmpipe sweep -S 'pretrain.model.n_layer=range(2,7,2)' --name depth --dry-run
  lmpipe sweep --params-file sets.yaml --local 1    # a YAML list of {KEY: VALUE} sets
  lmpipe sweep report depth                         # table + PNG, logged to MLflow
  lmpipe sweep apply depth                          # the best point into the workspace

-S takes DVC's sweep syntax (`dvc exp run --queue -S`): a,b  range(1,4)  choice(a,b);
a list [1,2] is one value. A sweep runs HEAD (commit first); on a pool, push it first.
Workers on a pool need PREFECT_API_URL, MLFLOW_TRACKING_URI, LMPIPE_DVC_REMOTE and a git
remote they can clone and push (README: "Parameter sweeps").
"""


def _csv(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def register(sub) -> None:
    p = sub.add_parser(
        "sweep", help="run a grid of params as DVC experiments on Prefect workers",
        description="Expand a grid of params (and/or a file of param sets), open one MLflow "
        "parent run, and run each point as a DVC experiment on a Prefect work pool, in a "
        "clean clone of the sweep's commit. Stages no swept param reaches run once.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-S", "--set-param", dest="set_args", action="append", default=[],
                   metavar="KEY=V1,V2", help="a swept param (repeat for a grid)")
    p.add_argument("--params-file", help="YAML/JSON list of param sets ({KEY: VALUE} each)")
    p.add_argument("--name", help="the sweep's name (default: sweep-DATE-TIME); points are "
                   "the DVC experiments NAME-1, NAME-2, ...")
    p.add_argument("--stages", type=_csv, help="comma-separated stages each point runs "
                   "(with their upstream; default: all)")
    p.add_argument("--pool", help="Prefect work pool (default: gpu; with --local: lmpipe-local)")
    p.add_argument("--local", type=int, metavar="N",
                   help="run on this machine with N local process workers")
    p.add_argument("--git-remote", help="git remote (name or URL) the workers clone and push "
                   "experiments to (default: origin; with --local: this checkout)")
    p.add_argument("--retries", type=int, default=2,
                   help="attempts after the first for a point that crashes or fails (not for "
                   "bad input, exit 2); default 2")
    p.add_argument("--crash-after", type=float, metavar="SECONDS",
                   help="a running point with no heartbeat for this long is Crashed and "
                   "retried (default 600, with --local 90; workers' heartbeat: "
                   "PREFECT_FLOWS_HEARTBEAT_FREQUENCY)")
    p.add_argument("--target", help="metric the report sorts by (default: test bits per byte "
                   "of the model the swept section trains, e.g. evaluate.transformer.test_bpb)")
    p.add_argument("--maximize", action="store_true", help="higher target is better")
    p.add_argument("--dry-run", action="store_true", help="print the points and stages only")
    actions = p.add_subparsers(dest="action", metavar="{report,apply}")
    r = actions.add_parser("report", help="the sweep's table and figure (logged to MLflow)",
                           epilog="example: lmpipe sweep report depth --target "
                           "evaluate.transformer.test_bpb")
    r.add_argument("sweep", help="the sweep's name")
    r.add_argument("--target", help="sort by this metric instead of the sweep's target")
    r.add_argument("--maximize", action="store_true", default=None)
    a = actions.add_parser("apply", help="apply the best point to the workspace (dvc exp apply)",
                           epilog="example: lmpipe sweep apply depth   (then `git diff`, "
                           "`dvc params diff`, commit)")
    a.add_argument("sweep", help="the sweep's name")
    a.add_argument("--point", help="apply this point instead of the best one")
    a.add_argument("--git-remote", help="where to pull the experiment from (default: where "
                   "the sweep's workers pushed it)")
    p.set_defaults(func=run)


def _check(args) -> None:
    if args.local is not None and args.local < 1:
        raise InputError(f"--local: must be >= 1, got {args.local}")
    if args.retries < 0:
        raise InputError(f"--retries: must be >= 0, got {args.retries}")
    if args.crash_after is not None and args.crash_after < 45:
        raise InputError(f"--crash-after: must be >= 45 (Prefect's shortest heartbeat is 30 s), "
                         f"got {args.crash_after:g}")


def run(args) -> int:
    root = project_root()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    if args.action == "report":
        return report(root, args)
    if args.action == "apply":
        return apply(root, args)
    _check(args)
    from lmpipe.cli.run import use_checkout  # deferred: the library loads when a verb runs

    use_checkout(root)
    # deferred: pipeline/ belongs to the checkout, importable once it is on sys.path
    from pipeline.sweep import SweepOptions, run_sweep
    from pipeline.sweep_plan import check_name, default_name

    name = check_name(args.name) if args.name else default_name()
    return run_sweep(root, SweepOptions(
        name=name, set_args=args.set_args, params_file=args.params_file, stages=args.stages,
        pool=args.pool, git_remote=args.git_remote, local=args.local, retries=args.retries,
        crash_after=args.crash_after, target=args.target, maximize=args.maximize,
        dry_run=args.dry_run))


def report(root: Path, args) -> int:
    from lmpipe.core.params import tracking_experiment  # deferred: as above
    from lmpipe.tracking.sweep import mlflow_client, sweep_report

    _, markdown, png = sweep_report(mlflow_client(), tracking_experiment(root), args.sweep,
                                    args.target, args.maximize,
                                    root / ".lmpipe" / "sweeps" / args.sweep)
    print(markdown, end="")
    if png:
        print(f"\nfigure: {png} (also in the sweep's MLflow run, sweep/report.png)")
    return 0


def apply(root: Path, args) -> int:
    """`dvc exp apply` of the best point (or --point), after `dvc exp pull` when the
    experiment is not in this checkout yet. Refuses a workspace with uncommitted changes:
    `dvc exp apply` would overwrite them without asking."""
    from lmpipe.core.dvc_cli import run_dvc  # deferred: as above
    from lmpipe.core.git import git
    from lmpipe.core.params import tracking_experiment
    from lmpipe.tracking import sweep as tracking

    changed = git(root, "status", "--porcelain", "--untracked-files=no")
    if changed:
        raise InputError("tracked files differ from HEAD (" + ", ".join(
            line.split(maxsplit=1)[-1] for line in changed.splitlines()[:8]) + "); commit or "
            "stash them first: "
            "`dvc exp apply` would overwrite them. Nothing was changed")
    client = tracking.mlflow_client()
    parent = tracking.find_sweep(client, tracking_experiment(root), args.sweep)
    rows = tracking.point_rows(client, parent)
    target = parent.data.tags.get(tracking.TARGET_TAG, "evaluate.transformer.test_bpb")
    rep = tracking.build_report(rows, target,
                                parent.data.tags.get(tracking.MAXIMIZE_TAG) == "true")
    row = next((r for r in rows if r.name == args.point), None) if args.point else rep.best
    if row is None:
        raise InputError(f"sweep {args.sweep}: " + (
            f"no point named {args.point!r} ({', '.join(r.name for r in rows)})" if args.point
            else "no point has finished yet"))
    exp = row.experiment
    if not any(line.endswith(f"/{exp}") for line in
               git(root, "for-each-ref", "--format=%(refname)", "refs/exps").splitlines()):
        remote = args.git_remote or parent.data.tags.get(tracking.GIT_REMOTE_TAG, "origin")
        run_dvc(root, "exp", "pull", remote, exp)
    applied = run_dvc(root, "exp", "apply", "--no-force", exp, check=False)
    # `dvc exp apply` writes the experiment's files, then checks out every out of dvc.yaml:
    # outs of stages the sweep did not run (or not in this cache yet) fail that second part.
    rev = next((line.split()[0] for line in git(
        root, "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps").splitlines()
        if line.endswith(f"/{exp}")), "HEAD")
    same = all(git(root, "show", f"{rev}:{name}") == (root / name).read_text().strip()
               for name in ("params.yaml", "dvc.lock") if (root / name).exists())
    if applied.returncode != 0 and not (same and "Checkout failed" in applied.stderr):
        raise RuntimeError(f"dvc exp apply {exp} failed: {applied.stderr.strip()[-2000:]}")
    has_remote = run_dvc(root, "remote", "default", check=False).stdout.strip()
    pulled = run_dvc(root, "pull" if has_remote else "checkout", "--allow-missing", check=False)
    if pulled.returncode != 0:
        print(f"note: some outs are not in the workspace ({pulled.stderr.strip()[-300:]})")
    values = " ".join(f"{k}={v}" for k, v in sorted(row.params.items()))
    print(f"applied {exp} ({values}; {target} {row.metrics.get(target, float('nan')):.4f}) to "
          f"{root}\n`git diff` / `dvc params diff` show the change; commit it to keep it")
    return 0

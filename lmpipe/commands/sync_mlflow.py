"""`lmpipe sync-mlflow`: record the checkout's current DVC state as an MLflow run.

For work done outside the flow (a plain `dvc repro`, a `dvc pull` of a colleague's results):
one run, like the flow's parent run, holding dvc.lock, every metrics/*.json, their numbers and
the summary table, tagged with the git commit and `dvc_lock_md5_end`, so that
`lmpipe lineage` finds the run that corresponds to this exact dvc.lock.
"""

from __future__ import annotations

import argparse

from lmpipe.paths import project_root


def register(sub) -> None:
    p = sub.add_parser(
        "sync-mlflow",
        help="log dvc.lock and metrics/*.json of this checkout to MLflow as one run",
        description="Record the current DVC state (dvc.lock, metrics files, summary table) "
        "as an MLflow run tagged like the flow's parent run, for results produced outside "
        "`lmpipe run` (a plain `dvc repro`, a `dvc pull`). Runs no stage.",
        epilog="example: dvc repro && lmpipe sync-mlflow",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: "
                   "tracking.experiment in params.yaml)")
    p.set_defaults(func=run)


def run(args) -> int:
    from lmpipe.errors import InputError
    from lmpipe.tracking import MLflowLogger, git_state
    from pipeline.flow import RunReport, dvc_lock_md5, finish_parent_run, load_flow_params

    root = project_root()
    if not (root / "dvc.lock").exists():
        raise InputError(f"{root / 'dvc.lock'}: nothing to sync yet (run the pipeline first)")
    experiment = args.experiment or load_flow_params(root).tracking.experiment
    logger = MLflowLogger("pipeline", experiment=experiment)
    if not logger.run_id:
        print("lmpipe sync-mlflow: MLflow unavailable (see the warning above)")
        return 1
    logger.set_tags({"lmpipe.kind": "pipeline", "lmpipe.sync": "true",
                     "dvc_lock_md5": dvc_lock_md5(root), **git_state(root)})
    report = RunReport(root=str(root), planned=[])
    try:
        finish_parent_run(logger, root, report)
    finally:
        logger.close("FINISHED")
    print(f"logged dvc.lock {report.dvc_lock_md5} and metrics/*.json to MLflow run "
          f"{logger.run_id} (experiment {experiment!r})")
    return 0

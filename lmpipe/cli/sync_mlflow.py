"""`lmpipe sync-mlflow`: record the checkout's current DVC state in MLflow, and replay the
stage runs MLflow missed.

For work done outside the flow (a plain `dvc repro`, a `dvc pull` of a colleague's results)
or while the tracking store was down:
- one run, like the flow's parent run, holding dvc.lock, every metrics/*.json, their numbers
  and the summary table, tagged with the git commit and `dvc_lock_md5_end`, so that
  `lmpipe lineage` finds the run that corresponds to this exact dvc.lock;
- for each stage in dvc.lock that MLflow has no run of (rule in lmpipe/tracking/replay.py), a child
  run rebuilt from its metrics file, loss plots and dvc.lock entry, tagged
  `lmpipe.replayed=true`. A second sync finds those and replays nothing.
"""

from __future__ import annotations

import argparse

from lmpipe.core.errors import InputError
from lmpipe.core.git import git_state
from lmpipe.core.params import tracking_experiment
from lmpipe.core.paths import project_root


def register(sub) -> None:
    p = sub.add_parser(
        "sync-mlflow",
        help="log dvc.lock and metrics/*.json to MLflow and replay missing stage runs",
        description="Record the current DVC state (dvc.lock, metrics files, summary table) "
        "as an MLflow run tagged like the flow's parent run, for results produced outside "
        "`lmpipe run` (a plain `dvc repro`, a `dvc pull`). Then replay, as child runs of it, "
        "the stage runs MLflow lacks (e.g. it was down while the stages ran): each gets the "
        "stage's params and dep md5s from dvc.lock, the numbers of metrics/<stage>.json, "
        "the per-step train_loss/val_loss/lr of plots/<stage>/loss.csv and the plots as "
        "artifacts. A stage counts as present when a run tagged dvc_stage=<stage> carries "
        "the md5 of its current dvc.lock entry or logged exactly the numbers of its metrics "
        "file. Runs no stage.",
        epilog="examples:\n"
        "  dvc repro && lmpipe sync-mlflow\n"
        "  MLFLOW_TRACKING_URI=http://mlflow:5000 lmpipe sync-mlflow   # after the server is back\n"
        "  lmpipe sync-mlflow --no-replay      # only the pipeline-level run",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: "
                   "tracking.experiment in params.yaml)")
    p.add_argument("--no-replay", action="store_true",
                   help="log only the pipeline-level run, replay no stage run")
    p.set_defaults(func=run)


def run(args) -> int:
    # deferred: mlflow takes seconds to import, `lmpipe --help` should not
    from mlflow.tracking import MlflowClient

    from lmpipe.core.metric_logger import default_tracking_uri
    from lmpipe.core.params import load_params
    from lmpipe.tracking.pipeline_run import finish_pipeline_run, open_pipeline_run
    from lmpipe.tracking.replay import replay_missing, stage_records

    root = project_root()
    if not (root / "dvc.lock").exists():
        raise InputError(f"{root / 'dvc.lock'}: nothing to sync yet (run the pipeline first)")
    experiment = args.experiment or tracking_experiment(root)
    git = git_state(root)
    # Read and check every stage's files before writing anything to MLflow.
    records = [] if args.no_replay else stage_records(root, git)
    try:
        params = load_params(root / "params.yaml")
    except InputError:
        params = None   # the record is still worth keeping; its params are in dvc.lock
    logger = open_pipeline_run(root, experiment, "sync-mlflow", params,
                               tags={"lmpipe.sync": "true", "lmpipe.started_by": "sync-mlflow"})
    if not logger.run_id:
        print("lmpipe sync-mlflow: MLflow unavailable (see the warning above)")
        return 1
    status = "FAILED"
    try:
        _, digest = finish_pipeline_run(logger, root)
        print(f"logged dvc.lock {digest} and metrics/*.json to MLflow run "
              f"{logger.run_id} (experiment {experiment!r})")
        if records:
            client = MlflowClient(tracking_uri=default_tracking_uri())
            exp_id = client.get_experiment_by_name(experiment).experiment_id
            replayed = replay_missing(client, exp_id, records, logger.run_id, root)
            logger.set_tags({"lmpipe.replayed_stages": ",".join(replayed) or "none"})
            print(f"replayed {len(replayed)} of {len(records)} stage runs"
                  + (f": {', '.join(replayed)}" if replayed else " (all already in MLflow)"))
        status = "FINISHED"
    finally:
        logger.close(status)
    return 0

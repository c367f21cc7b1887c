"""`lmpipe ui`: MLflow's UI on this project's store, opened on the lmpipe experiment's runs table."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import textwrap

from lmpipe.core.errors import InputError
from lmpipe.core.params import tracking_experiment
from lmpipe.core.paths import project_root

# MLflow 3.17's UI ignores the experiment's `mlflow.experimentKind` tag: a browser-wide
# "GenAI | Model training" switch (default GenAI) picks an experiment's first page, and opens
# an empty GenAI overview (traces, token usage). The `workflowType` URL parameter overrides
# the switch, so the link printed here lands on the training runs table.
RUNS_PAGE = "{base}/#/experiments/{exp_id}/runs?workflowType=machine_learning"


def register(sub) -> None:
    p = sub.add_parser(
        "ui",
        help="start MLflow's UI on this project's runs (127.0.0.1) and print the link",
        description=textwrap.fill(
            "Start `mlflow ui` on the project's tracking store (MLFLOW_TRACKING_URI, default "
            "sqlite:///mlflow.db), bound to 127.0.0.1, and print the link that opens the "
            "experiment on its training runs table (pipeline runs, each with its stage runs). "
            "Select two pipeline runs, Compare, and switch on \"Show diff only\".", width=88),
        epilog="examples:\n  lmpipe ui\n  lmpipe ui --port 5001",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--experiment", default=None,
                   help="MLflow experiment (default: tracking.experiment in params.yaml)")
    p.set_defaults(func=run)


def run(args) -> int:
    # deferred: mlflow takes seconds to import, `lmpipe --help` should not
    from mlflow.tracking import MlflowClient

    from lmpipe.core.metric_logger import default_tracking_uri, ensure_experiment

    root = project_root()
    uri = default_tracking_uri()
    experiment = args.experiment or tracking_experiment(root)
    client = MlflowClient(uri)
    if client.get_experiment_by_name(experiment) is None:
        raise InputError(f"no MLflow experiment {experiment!r} in {uri}; run the pipeline first")
    exp_id = ensure_experiment(client, experiment)
    mlflow = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or shutil.which("mlflow")
    if mlflow is None:
        raise InputError("the `mlflow` command is not installed in this environment")
    # one web worker and no job runners: the UI answers in seconds instead of half a minute
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    print(f"lmpipe ui: {RUNS_PAGE.format(base=f'http://127.0.0.1:{args.port}', exp_id=exp_id)}",
          flush=True)
    os.execv(mlflow, [mlflow, "ui", "--host", "127.0.0.1", "--port", str(args.port),
                      "--workers", "1", "--backend-store-uri", uri])
    return 0   # not reached: the UI runs until stopped

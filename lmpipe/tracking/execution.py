"""The pipeline run of a plain `dvc repro` or `dvc exp run`: opened first, closed last.

The Prefect flow opens its own pipeline run around the stages (`lmpipe run`). A plain `dvc
repro` or `dvc exp run` has no such wrapper, and DVC offers no hook before or after a run, so:

- the `params` stage, which DVC runs before every other stage, opens the run
  (`open_execution_run`), tagged with the execution: the host, pid and start time of the
  `dvc` process that runs the stages (`lmpipe.core.dvc_cli.execution_id`);
- each stage of the same execution finds it by that tag and becomes its child
  (`lmpipe.core.metric_logger.execution_parent`);
- a small detached process started by the `params` stage waits for that `dvc` process to
  exit, then records what the execution left: every metrics file (stages restored from the
  run cache included), dvc.lock and its md5, the summary table, and the outcome (failed when
  any stage run failed or never finished). Only then is the run's end known: DVC writes
  dvc.lock after each stage's command, so no stage can see the final one.

`python -m lmpipe.tracking.execution RUN_ID PID ROOT EXPERIMENT` is that waiting process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from lmpipe.core.dvc_cli import dvc_ancestor, execution_id
from lmpipe.core.metric_logger import EXECUTION_TAG, MLflowLogger
from lmpipe.core.names import DVC_EXP_NAME_ENV, PARENT_RUN_ENV
from lmpipe.core.params import Params
from lmpipe.core.paths import scratch_dir
from lmpipe.tracking.pipeline_run import finish_pipeline_run, open_pipeline_run


def open_execution_run(root: Path, params: Params) -> str | None:
    """Open the pipeline run of the DVC execution this stage runs under and start the process
    that closes it. None (and nothing done) under the flow, which has its own, outside DVC,
    or when tracking is off or down."""
    if os.environ.get(PARENT_RUN_ENV):
        return None
    proc = dvc_ancestor()
    if proc is None:
        return None
    exp = os.environ.get(DVC_EXP_NAME_ENV)
    label = f"exp {exp}" if exp else "dvc repro"
    run = open_pipeline_run(root, params.tracking.experiment, label, params, tags={
        EXECUTION_TAG: execution_id(proc), "lmpipe.started_by": "dvc exp run" if exp else "dvc repro"})
    if not run.run_id:
        return None
    log_dir = scratch_dir() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / f"pipeline-run-{run.run_id}.log", "w", encoding="utf-8") as log:
        subprocess.Popen(
            [sys.executable, "-m", "lmpipe.tracking.execution", run.run_id, str(proc.pid),
             str(root), params.tracking.experiment],
            cwd=root, env={**os.environ, "LMPIPE_ROOT": str(root)}, stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return run.run_id


def close_when_done(run_id: str, pid: int, root: Path, experiment: str) -> str:
    """Wait for the `dvc` process `pid` to exit, then record the execution's end in `run_id`.
    Returns the status set (FINISHED or FAILED)."""
    try:
        psutil.Process(pid).wait()
    except psutil.NoSuchProcess:
        pass
    except psutil.Error:   # not ours to wait on: poll
        while psutil.pid_exists(pid):
            time.sleep(0.5)
    run = MLflowLogger("pipeline", experiment=experiment, attach=run_id)
    if not run.run_id:
        return "UNKNOWN"
    failures = unfinished_children(run)
    status = "FAILED" if failures else "FINISHED"
    try:
        finish_pipeline_run(run, root, failures=failures)
    finally:
        run.close(status)
    return status


def unfinished_children(run: MLflowLogger) -> dict[str, str]:
    """{stage: why} for each stage run of the execution that failed or never finished."""
    children = run.client.search_runs([run.experiment_id],
                                      f"tags.mlflow.parentRunId = '{run.run_id}'")
    return {c.data.tags.get("dvc_stage", c.info.run_id): c.info.status.lower()
            for c in children if c.info.status != "FINISHED"}


if __name__ == "__main__":
    status = close_when_done(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4])
    print(f"lmpipe: pipeline run {sys.argv[1]}: {status}")

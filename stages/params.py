"""Stage `params`: params.yaml checked whole, before any other stage deletes its outputs.

    python -m stages.params     (the first stage of every `dvc repro` and `dvc exp run`)

Reads  params.yaml, all of it (dvc.yaml tracks the whole file), and the project's code.
Writes .lmpipe/params-checked, which every other stage lists as a dep; under a plain `dvc
       repro` or `dvc exp run`, opens the execution's MLflow pipeline run (every stage run
       becomes its child) and starts the process that closes it when DVC exits
       (lmpipe/tracking/execution.py).

Why a stage of its own: DVC deletes a stage's outs before it runs the command, so a stage
that finds a typo in its own params (`dvc exp run -S +pretrain.train.lrr=1`) is too late:
its model is already gone. DVC runs the stages a change touches in graph order, and this
one is upstream of all of them and re-runs whenever params.yaml or any code changes, so a
typo, a wrong value or the wrong interpreter (stages/__init__.py) stops the run here, with
exit 2 and the key path, before DVC has deleted anything.

Its out is `persist: true`, which keeps the stage out of DVC's run cache: it must really
run to check the file. The out's content never changes, so re-running it never makes a
downstream stage stale.
"""

from __future__ import annotations

import os

from lmpipe.core.files import write_text_atomic
from lmpipe.core.metric_logger import stage_logger
from lmpipe.core.names import CHECK_STAGE, PARENT_RUN_ENV
from lmpipe.core.params import Params
from lmpipe.core.paths import params_stamp, project_root
from lmpipe.core.stage import main_for
from lmpipe.tracking.execution import open_execution_run

NAME = CHECK_STAGE
STAMP = "params.yaml passed the schema in lmpipe/core/params.py\n"


def run(params: Params) -> None:
    # main_for has validated the whole file before calling this.
    write_text_atomic(params_stamp(), STAMP)
    pipeline_run = open_execution_run(project_root(), params)
    if pipeline_run:
        os.environ[PARENT_RUN_ENV] = pipeline_run
    # like every stage, a child run of the pipeline run: "params.yaml was checked here"
    with stage_logger(NAME, params.tracking.experiment) as log:
        log.set_tags({"lmpipe.params_checked": "true"})


if __name__ == "__main__":
    main_for(NAME, run)

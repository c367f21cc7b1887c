"""The Prefect flow that runs the DVC pipeline: one task per stage, DVC decides what is stale.

    lmpipe_pipeline(stages=None)            # every stage in dvc.yaml
    lmpipe_pipeline(stages=["pretrain"])    # pretrain and everything upstream of it

The flow
- holds the checkout's run lock (one pipeline run per checkout, pipeline/lock.py);
- reads the stage graph from DVC (`dvc dag`), so it runs whatever subset dvc.yaml declares;
- opens an MLflow parent run tagged with the git commit and the md5 of dvc.lock, and passes
  its id to every stage in LMPIPE_PARENT_RUN_ID (each stage's own run becomes a child);
- runs each stage as `dvc repro --single-item STAGE` in upstream-first order (upstream stages
  are their own tasks, so each stage gets its own retries and log; DVC alone decides whether
  the stage is stale, restores it from its run cache, or runs it). Prefect caching is off;
- retries a stage that exits 1 with exponential backoff, never one that exits 2 (bad params
  or input): `retry_condition_fn`;
- at the end logs dvc.lock and every metrics/*.json to the parent run (this covers stages
  that DVC skipped or restored, which log nothing themselves) and publishes the metrics
  table as a Prefect markdown artifact.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmpipe.core.dvc_cli import dvc_bin, dvc_env
from lmpipe.core.errors import EXIT_BAD_INPUT, InputError
from lmpipe.core.last_good import report_restored, restore_file_outs
from lmpipe.core.names import PARENT_RUN_ENV
from lmpipe.core.params import (
    PipelineParams,
    TrackingParams,
    format_validation_error,
    load_params,
    read_yaml,
)
from lmpipe.core.paths import project_root
from lmpipe.tracking.pipeline_run import finish_pipeline_run, open_pipeline_run
from pipeline.graph import StageGraph, read_stage_graph
from pipeline.lock import RunLock, repro_lock

_EXITED = re.compile(r"exited with (-?\d+)")
BAD_INPUT_NOTE = "(bad params or input: not retried)"
# DVC ends every `dvc repro` with the same advice (git add dvc.lock, autostage, dvc push):
# once per stage it was printed eight times. It stays in the stage's log file; the flow
# shows it once, at the end (lmpipe/cli/run.py).
DVC_HINTS = ("To track the changes with git", "git add ", "To enable auto staging",
             "dvc config core.autostage", "Use `dvc push` to send your updates")
NOT_RETRIED = {EXIT_BAD_INPUT, 130}


# ----------------------------------------------------------------------------- errors
class StageFailed(RuntimeError):
    """A stage's `dvc repro` failed. `retryable` is False for input errors (exit 2)."""

    def __init__(self, stage: str, exit_code: int | None, dvc_code: int, tail: str, log: str):
        self.stage = stage
        self.exit_code = exit_code  # the stage command's own exit code, when DVC reports it
        self.dvc_code = dvc_code
        self.tail = tail
        self.log = log
        if exit_code is not None:
            self.retryable = exit_code not in NOT_RETRIED
            why = f"its command exited with {exit_code}"
            if exit_code == EXIT_BAD_INPUT:
                why += f" {BAD_INPUT_NOTE}"
        else:
            # DVC itself failed (missing dependency, bad dvc.yaml ...): retrying cannot help,
            # except when another DVC process held the repo lock.
            self.retryable = "lock" in tail.lower()
            why = f"dvc repro exited with {dvc_code} before or around the command"
        super().__init__(f"stage {stage!r} failed: {why}; log: {log}\n--- last lines ---\n{tail}")

    def __reduce__(self):  # keep it picklable for process-based task runners
        return (StageFailed, (self.stage, self.exit_code, self.dvc_code, self.tail, self.log))


class PipelineFailed(RuntimeError):
    def __init__(self, failures: dict[str, str], skipped: list[str]):
        self.failures = failures
        self.skipped = skipped
        # every failure is the user's input: `lmpipe run` exits 2, like the stage did
        self.bad_input = bool(failures) and all(BAD_INPUT_NOTE in m for m in failures.values())
        lines = [f"lmpipe pipeline failed in stage(s) {', '.join(failures)}"]
        if skipped:
            lines.append(f"not run because an upstream stage failed: {', '.join(skipped)}")
        lines += [msg for msg in failures.values()]
        super().__init__("\n".join(lines))


def retry_unless_input_error(task, task_run, state) -> bool:
    """Prefect retry condition: retry transient failures, never a params/input error."""
    exc = state.data if isinstance(getattr(state, "data", None), BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception as err:  # pragma: no cover - result not retrievable
            exc = err
    return bool(getattr(exc, "retryable", True))


def backoff_delays(retries: int, first_s: float) -> list[float]:
    """Delays before each retry: first, 2*first, 4*first, ..."""
    return [first_s * (2**i) for i in range(retries)]


# ----------------------------------------------------------------------------- the stage task
def _last_segment(raw: bytes) -> str:
    # Progress bars rewrite a line with \r: keep only what the terminal would show.
    text = raw.decode("utf-8", errors="replace").rstrip("\n")
    return text.rsplit("\r", 1)[-1] if "\r" in text else text


def run_dvc_repro(
    stage: str,
    root: str | os.PathLike,
    parent_run_id: str | None = None,
    force: bool = False,
    tail_lines: int = 40,
    log_dir: str | os.PathLike | None = None,
    echo=None,
) -> dict[str, Any]:
    """`dvc repro --single-item STAGE` in `root`; raises StageFailed with the log tail."""
    root = Path(root)
    log_dir = Path(log_dir) if log_dir else root / ".lmpipe" / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{stage.replace('@', '_')}.log"
    cmd = [dvc_bin(), "--wait-for-lock", "repro", "--single-item", stage]
    if force:
        cmd.append("--force")
    extra = {"LMPIPE_ROOT": str(root), "PYTHONUNBUFFERED": "1"}
    if parent_run_id:
        extra[PARENT_RUN_ENV] = parent_run_id
    env = dvc_env(extra)
    if not parent_run_id:
        env.pop(PARENT_RUN_ENV, None)
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    outcome = "ran"
    started = time.monotonic()
    with repro_lock(root), open(log_path, "w", encoding="utf-8") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(
            cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = _last_segment(raw)
            log.write(line + "\n")
            log.flush()
            if not line.strip() or line.strip().startswith(DVC_HINTS):
                continue
            tail.append(line)
            if echo is not None:
                echo(line)
            if "didn't change, skipping" in line:
                outcome = "up to date"
            elif "is cached - skipping run" in line:
                outcome = "restored from run cache"
        code = proc.wait()
    seconds = round(time.monotonic() - started, 3)
    if code != 0:
        # DVC deleted the stage's outs before its command ran; put back the files dvc.lock
        # still describes (this also covers a stage killed before its own handler ran)
        note = report_restored(stage, *restore_file_outs(stage, root))
        if note:
            tail.append(note)
            if echo is not None:
                echo(note)
        text = "\n".join(tail)
        found = _EXITED.findall(text)
        exit_code = int(found[-1]) if found else None
        raise StageFailed(stage, exit_code, code, text, str(log_path))
    return {"stage": stage, "outcome": outcome, "seconds": seconds, "log": str(log_path)}


@task(
    name="dvc-repro",
    task_run_name="{stage}",
    cache_policy=NO_CACHE,
    retry_condition_fn=retry_unless_input_error,
)
def repro_stage(
    stage: str,
    root: str,
    parent_run_id: str | None = None,
    force: bool = False,
    tail_lines: int = 40,
    log_dir: str | None = None,
) -> dict[str, Any]:
    """One DVC stage as a Prefect task."""
    logger = run_logger()
    logger.info("dvc repro --single-item %s", stage)
    # Each line of the stage's output goes to the Prefect log too (the UI shows it live).
    result = run_dvc_repro(stage, root, parent_run_id, force, tail_lines, log_dir,
                           echo=lambda line: logger.info("[%s] %s", stage, line))
    logger.info("stage %s: %s in %.1f s (log: %s)", stage, result["outcome"], result["seconds"],
                result["log"])
    return result


def run_logger():
    try:
        return get_run_logger()
    except Exception:  # outside a run (`.fn()` in tests)
        return logging.getLogger("lmpipe.pipeline")


# ----------------------------------------------------------------------------- task runners
def make_task_runner(name: str):
    """sequential (None: tasks run one by one in the flow), thread, dask or ray.

    Independent stages are submitted together; on one checkout their `dvc repro` calls are
    still serialised (DVC keeps one repo lock per checkout), see README "Scale-out".
    """
    if name in (None, "", "sequential"):
        return None
    if name == "thread":
        return ThreadPoolTaskRunner(max_workers=int(os.environ.get("LMPIPE_MAX_WORKERS", "4")))
    if name == "dask":
        try:
            from prefect_dask import DaskTaskRunner  # deferred: an optional extra
        except ImportError:
            raise InputError("task runner 'dask' needs `pip install prefect-dask`") from None
        address = os.environ.get("LMPIPE_DASK_ADDRESS")
        if address:
            return DaskTaskRunner(address=address)
        # A local cluster of threads: stages are subprocesses, so worker processes buy nothing.
        return DaskTaskRunner(cluster_kwargs={"n_workers": 1, "threads_per_worker": 4,
                                              "processes": False, "dashboard_address": None})
    if name == "ray":
        try:
            from prefect_ray import RayTaskRunner  # deferred: an optional extra
        except ImportError:
            raise InputError("task runner 'ray' needs `pip install prefect-ray`") from None
        return RayTaskRunner(address=os.environ.get("LMPIPE_RAY_ADDRESS"))
    raise InputError(f"unknown task runner {name!r}: use sequential, thread, dask or ray")


# ----------------------------------------------------------------------------- the flow
@dataclass
class RunReport:
    root: str
    planned: list[str]
    parent_run_id: str | None = None
    results: list[dict] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    markdown: str = ""
    dvc_lock_md5: str = ""

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class FlowSections(BaseModel):
    """The sections of params.yaml the flow itself reads; the stages check the rest."""

    model_config = ConfigDict(extra="ignore")
    pipeline: PipelineParams = Field(default_factory=PipelineParams)
    tracking: TrackingParams = Field(default_factory=TrackingParams)


def load_flow_params(root: Path, params_file: str | None = None) -> FlowSections:
    """The `pipeline` and `tracking` sections of params.yaml, validated (`.pipeline`,
    `.tracking`).

    The other sections belong to the stages, which validate the whole file themselves (and
    exit 2 on an error, which the flow reports without retrying).
    """
    path = Path(params_file) if params_file else root / "params.yaml"
    raw = (read_yaml(path) if path.exists() else None) or {}
    if not isinstance(raw, dict):
        raise InputError(f"{path}: the top level must be a mapping of sections")
    raw = {k: v for k, v in raw.items() if k in ("pipeline", "tracking") and v is not None}
    try:
        return FlowSections.model_validate(raw)
    except ValidationError as err:
        raise InputError(f"{path}: {format_validation_error(err)}") from None


def _open_parent_run(root: Path, experiment: str, params_file: str | None):
    """The flow's pipeline run (lmpipe/tracking/pipeline_run.py), holding the whole
    params.yaml when it is valid (when not, the `params` stage reports it)."""
    try:
        params = load_params(params_file or root / "params.yaml")
    except InputError:
        params = None
    return open_pipeline_run(root, experiment, "lmpipe run", params,
                             tags={"lmpipe.started_by": "lmpipe run"})


def _flow_run_id() -> str | None:
    try:
        from prefect.runtime import (
            flow_run,  # deferred: only meaningful inside a flow run
        )

        return flow_run.id
    except Exception:  # pragma: no cover
        return None


def run_stages(
    graph: StageGraph,
    order: list[str],
    root: Path,
    parent_run_id: str | None,
    force: set[str],
    params,
    task_runner: str,
) -> tuple[list[dict], dict[str, str], list[str]]:
    """Run `order` (already upstream-complete); a failure skips only what depends on it."""
    pp = params.pipeline
    stage_task = repro_stage.with_options(
        retries=pp.retries,
        retry_delay_seconds=backoff_delays(pp.retries, pp.retry_delay_s) if pp.retries else 0,
    )
    log_dir = root / ".lmpipe" / "logs" / (_flow_run_id() or time.strftime("%Y%m%dT%H%M%S"))
    results: list[dict] = []
    failures: dict[str, str] = {}
    skipped: list[str] = []

    def blocked(stage: str) -> bool:
        return bool(graph.ancestors(stage) & (set(failures) | set(skipped)))

    def kwargs(stage: str) -> dict:
        return dict(stage=stage, root=str(root), parent_run_id=parent_run_id,
                    force=stage in force, tail_lines=pp.log_tail_lines, log_dir=str(log_dir))

    def record(stage: str, state) -> None:
        if state.is_completed():
            results.append(state.result())
        else:
            try:
                state.result()
            except Exception as err:
                failures[stage] = str(err)
            else:  # pragma: no cover - a non-completed state always raises
                failures[stage] = f"stage {stage!r} ended in state {state.type.value}"

    runner = make_task_runner(task_runner)
    if runner is None:
        for stage in order:
            if blocked(stage):
                skipped.append(stage)
                continue
            record(stage, stage_task(**kwargs(stage), return_state=True))
        return results, failures, skipped

    with runner:
        for wave in graph.levels(order):
            futures = {}
            for stage in wave:
                if blocked(stage):
                    skipped.append(stage)
                    continue
                futures[stage] = runner.submit(stage_task, parameters=kwargs(stage))
            for stage, fut in futures.items():
                fut.wait()
                record(stage, fut.state)
    return results, failures, skipped


def publish_markdown(markdown: str, key: str = "lmpipe-metrics") -> None:
    try:
        from prefect.artifacts import (
            create_markdown_artifact,  # deferred: needs a flow run
        )

        create_markdown_artifact(markdown=markdown, key=key,
                                 description="lmpipe: metrics of the pipeline run")
    except Exception as err:  # pragma: no cover - no API (plain `.fn()` call)
        run_logger().warning("could not publish the markdown artifact: %s", err)


def pipeline_body(
    stages: list[str] | None = None,
    force: list[str] | None = None,
    root: str | None = None,
    lock_wait_s: float | None = None,
    task_runner: str | None = None,
    params_file: str | None = None,
) -> dict:
    root_path = Path(root).resolve() if root else project_root()
    with root_env(root_path):
        return _pipeline_body(root_path, stages, force, lock_wait_s, task_runner, params_file)


@contextlib.contextmanager
def root_env(root: Path):
    """Stages, MLflow's default store and git_state() all resolve the root the same way."""
    old = os.environ.get("LMPIPE_ROOT")
    os.environ["LMPIPE_ROOT"] = str(root)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LMPIPE_ROOT", None)
        else:
            os.environ["LMPIPE_ROOT"] = old


def _pipeline_body(root_path: Path, stages, force, lock_wait_s, task_runner, params_file) -> dict:
    params = load_flow_params(root_path, params_file)
    wait = params.pipeline.lock_wait_s if lock_wait_s is None else lock_wait_s
    runner_name = task_runner or params.pipeline.task_runner
    logger = run_logger()
    with RunLock(root_path, wait_s=wait, stages=stages):
        graph = read_stage_graph(root_path)
        order = graph.resolve(stages)
        force_set: set[str] = set()
        if force:
            graph.resolve(force)  # names must exist
            force_set = {s for s in order if s in force or s.split("@")[0] in force}
        report = RunReport(root=str(root_path), planned=order)
        if not order:
            logger.warning("dvc.yaml in %s declares no stages: nothing to run", root_path)
        else:
            logger.info("stages, upstream first: %s", " -> ".join(order))
        parent = _open_parent_run(root_path, params.tracking.experiment, params_file)
        report.parent_run_id = parent.run_id
        parent.set_tags({
            "lmpipe.stages": ",".join(order) or "none",
            "lmpipe.requested": ",".join(stages) if stages else "all",
            "prefect.flow_run_id": _flow_run_id() or "none",
        })
        status = "FAILED"
        try:
            report.results, report.failures, report.skipped = run_stages(
                graph, order, root_path, parent.run_id, force_set, params, runner_name
            )
            status = "FAILED" if report.failures else "FINISHED"
        finally:
            try:
                report.markdown, report.dvc_lock_md5 = finish_pipeline_run(
                    parent, root_path, report.results, report.failures)
            finally:
                parent.close(status)
        publish_markdown(report.markdown)
        if report.failures:
            raise PipelineFailed(report.failures, report.skipped)
        return report.as_dict()


@flow(name="lmpipe-pipeline", log_prints=True, validate_parameters=True)
def lmpipe_pipeline(
    stages: list[str] | None = None,
    force: list[str] | None = None,
    root: str | None = None,
    lock_wait_s: float | None = None,
    task_runner: str | None = None,
) -> dict:
    """Run the DVC stages (all, or `stages` with their upstream) under one MLflow parent run.

    `force` names stages to re-run even when DVC finds them up to date (`dvc repro --force`).
    `root` is the checkout (default: the working directory). `lock_wait_s` overrides
    pipeline.lock_wait_s (0 fail at once when another run holds the checkout, -1 wait).
    """
    return pipeline_body(stages, force, root, lock_wait_s, task_runner)

"""Replay stage runs that MLflow missed, from the files the stages left (`lmpipe sync-mlflow`).

When the tracking store is down a stage warns once and completes; its metrics file, loss
plots and dvc.lock entry are the record. This module rebuilds the stage's MLflow run from
that record: tags (`dvc_stage`, `dvc_dep.<path>` md5s from dvc.lock, git commit), params
(the stage's params from dvc.lock, flattened `section.key`), the numeric metrics of
metrics/<stage>.json (nested dicts flattened with dots), the per-step `train_loss`,
`val_loss` and `lr` of plots/<stage>/loss.csv, and the loss plot / report as artifacts.

A stage is *already recorded* (and not replayed) when the experiment holds a run tagged
`dvc_stage=<stage>` that either
  (a) carries `dvc_lock_entry_md5` equal to the md5 of the stage's current dvc.lock entry
      (every replayed run carries it, so a second sync replays nothing), or
  (b) logged exactly the numbers of metrics/<stage>.json: at least one key in common, and
      every key in common equal. Metrics files hold wall-clock fields (seconds, tokens per
      second), so this names the very execution that wrote the file; a live stage run logs
      its metrics file, so it matches without any extra tag.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from lmpipe.core.metric_logger import flatten
from lmpipe.core.names import CHECK_STAGE, LOSS_CSV, LOSS_PNG
from lmpipe.core.records import (
    numeric_leaves,
    read_lock,
    read_loss_csv,
    read_stage_metrics,
)

ENTRY_TAG = "dvc_lock_entry_md5"
SERIES = ("train_loss", "val_loss", "lr")  # per-step columns of plots/<stage>/loss.csv


@dataclass
class StageRecord:
    """What the files say about one stage: everything its replayed run will hold."""

    stage: str
    entry_md5: str
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]                       # from metrics/<stage>.json
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # loss.csv
    artifacts: list[tuple[Path, str]] = field(default_factory=list)  # (file, artifact dir)


def entry_md5(entry: dict) -> str:
    """md5 of a dvc.lock stage entry (cmd, deps, params, outs), key order independent."""
    blob = json.dumps(entry, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.md5(blob.encode("utf-8")).hexdigest()


def stage_metrics(root: Path, stage: str) -> dict[str, float]:
    """The numbers of metrics/<stage>.json, nested keys joined with dots."""
    return numeric_leaves(read_stage_metrics(stage, root))


def read_loss_series(path: Path) -> dict[str, list[tuple[int, float]]]:
    """{column: [(step, value), ...]} of a loss.csv, measured cells only, in file order."""
    series: dict[str, list[tuple[int, float]]] = {c: [] for c in SERIES}
    for row in read_loss_csv(path):
        for col in SERIES:
            if col in row and math.isfinite(row[col]):
                series[col].append((int(row["step"]), row[col]))
    return {c: s for c, s in series.items() if s}


def stage_record(root: Path, stage: str, entry: dict, git: dict[str, str]) -> StageRecord:
    """Read (and validate) the files of one stage; touches no MLflow store."""
    tags = {"dvc_stage": stage, "lmpipe.stage": stage, "lmpipe.replayed": "true",
            "mlflow.runName": stage, **git}
    for dep in entry.get("deps") or []:
        if isinstance(dep, dict) and dep.get("path") and dep.get("md5"):
            tags[f"dvc_dep.{dep['path']}"] = str(dep["md5"])
    md5 = entry_md5(entry)
    tags[ENTRY_TAG] = md5
    params: dict[str, str] = {}
    for _file, values in sorted((entry.get("params") or {}).items()):
        if isinstance(values, dict):
            params.update({k: str(v)[:6000] for k, v in flatten(values).items()})
    metrics = stage_metrics(root, stage)
    record = StageRecord(stage, md5, tags, params, metrics)
    plots = root / "plots" / stage
    if (plots / LOSS_CSV).is_file():
        record.series = read_loss_series(plots / LOSS_CSV)
    for name in (LOSS_CSV, LOSS_PNG):
        if (plots / name).is_file():
            record.artifacts.append((plots / name, f"plots/{stage}"))
    if (root / "metrics" / f"{stage}.json").is_file():
        record.artifacts.append((root / "metrics" / f"{stage}.json", "metrics"))
    if stage == "evaluate" and (root / "reports").is_dir():
        for path in sorted((root / "reports").iterdir()):
            if path.is_file() and path.suffix in (".md", ".png"):
                record.artifacts.append((path, "reports"))
    # The CSV owns the per-step names; the metrics file's summary value of the same name
    # (a full val pass, an averaged last loss) is kept as final_<name> instead of adding a
    # second point at the last step.
    for col in record.series:
        if col in record.metrics:
            record.metrics[f"final_{col}"] = record.metrics.pop(col)
    return record


def stage_records(root: Path, git: dict[str, str]) -> list[StageRecord]:
    """Every stage of dvc.lock that runs as an MLflow stage run (the `params` check does not)."""
    return [stage_record(root, s, e or {}, git) for s, e in read_lock(root).items()
            if s != CHECK_STAGE]


# ----------------------------------------------------------------------------- MLflow side
def recorded_run(client, exp_id: str, record: StageRecord, file_metrics: dict[str, float]):
    """The run id that already records this stage's current result, or None (rule above)."""
    runs = client.search_runs([exp_id], f"tags.dvc_stage = '{record.stage}'",
                              max_results=200, order_by=["attributes.start_time DESC"])
    for run in runs:
        if run.data.tags.get(ENTRY_TAG) == record.entry_md5:
            return run.info.run_id
    for run in runs:
        if ENTRY_TAG in run.data.tags:
            continue  # a replay of another dvc.lock entry
        logged = run.data.metrics
        shared = [k for k in file_metrics if k in logged]
        if shared and all(math.isclose(logged[k], file_metrics[k], rel_tol=1e-9, abs_tol=1e-12)
                          for k in shared):
            return run.info.run_id
    return None


def replay(client, exp_id: str, record: StageRecord, parent_run_id: str) -> str:
    """Create the stage's run as a child of `parent_run_id`; returns its id."""
    from mlflow.entities import Metric, Param  # deferred: mlflow is slow to import

    run = client.create_run(exp_id, run_name=record.stage,
                            tags={**record.tags, "mlflow.parentRunId": parent_run_id})
    run_id = run.info.run_id
    try:
        params = [Param(k, v) for k, v in sorted(record.params.items())]
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i : i + 100])
        ts = int(time.time() * 1000)
        metrics = [Metric(k, v, ts, 0) for k, v in sorted(record.metrics.items())]
        for col, points in record.series.items():
            # one millisecond per row keeps the history in file order
            metrics += [Metric(col, v, ts + i, step) for i, (step, v) in enumerate(points)]
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i : i + 1000])
        for path, folder in record.artifacts:
            client.log_artifact(run_id, str(path), folder)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


def replay_missing(client, exp_id: str, records: list[StageRecord], parent_run_id: str,
                   root: Path, echo=print) -> dict[str, str]:
    """Replay every stage not already recorded; {stage: run id} of the replayed ones."""
    done: dict[str, str] = {}
    for record in records:
        existing = recorded_run(client, exp_id, record, stage_metrics(root, record.stage))
        if existing:
            echo(f"  {record.stage}: already in MLflow (run {existing})")
            continue
        done[record.stage] = replay(client, exp_id, record, parent_run_id)
        n = sum(len(s) for s in record.series.values())
        echo(f"  {record.stage}: replayed as run {done[record.stage]} "
             f"({len(record.metrics)} metrics, {n} loss points, {len(record.artifacts)} files)")
    return done

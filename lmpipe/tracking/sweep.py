"""A parameter sweep in MLflow: one parent run, one child per point, the report read back.

    sweep run   (tags lmpipe.sweep=NAME, lmpipe.sweep_role=sweep; params: the grid)
    ├── NAME-base   role base: the stages every point shares (download, tokenizer, ...)
    ├── NAME-1      role point: params = the point's overrides; metrics = every metrics file
    └── NAME-2      ...         each stage a point runs is a child of its point run

`lmpipe sweep` creates every child up front, so that a point retried after its worker died
keeps one run (the retry marks the dead attempt's stage runs KILLED). The point's flow run
(pipeline/sweep_point.py) fills it in: metrics, dvc.lock, its DVC experiment's name and
commit. The report reads only these runs: it works from any machine that reaches the
tracking server, long after the workers are gone.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmpipe.core.errors import InputError
from lmpipe.core.files import write_text_atomic
from lmpipe.core.metric_logger import default_tracking_uri, ensure_experiment
from lmpipe.core.names import MODEL_STAGE, MODELS
from lmpipe.evaluation.plots import plot_sweep

SWEEP_TAG = "lmpipe.sweep"          # the sweep's name, on the parent and every child
ROLE_TAG = "lmpipe.sweep_role"      # sweep | base | point
TARGET_TAG = "lmpipe.sweep_target"  # the metric the report sorts by
MAXIMIZE_TAG = "lmpipe.sweep_maximize"
GIT_REMOTE_TAG = "lmpipe.git_remote"  # where the points pushed their experiments
EXP_TAG = "dvc_exp_name"            # the DVC experiment holding the point's results
EXP_REV_TAG = "dvc_exp_rev"
EXIT_TAG = "lmpipe.exit_code"
ERROR_TAG = "lmpipe.error"


def mlflow_client(uri: str | None = None):
    from mlflow.tracking import MlflowClient  # deferred: mlflow takes seconds to import

    return MlflowClient(tracking_uri=uri or default_tracking_uri())


# ----------------------------------------------------------------------------- writing
@dataclass
class SweepRuns:
    name: str
    experiment_id: str
    sweep_run_id: str
    children: dict[str, str] = field(default_factory=dict)  # point or base name -> run id


def open_sweep(client, experiment: str, name: str, params: dict[str, Any],
               tags: dict[str, str]) -> SweepRuns:
    """The parent run of sweep `name` (InputError when one with that name exists)."""
    exp_id = ensure_experiment(client, experiment)
    if find_sweep(client, experiment, name, required=False) is not None:
        raise InputError(f"--name: a sweep named {name!r} already exists in MLflow experiment "
                         f"{experiment!r}; choose another name")
    run = client.create_run(exp_id, run_name=name, tags={
        "mlflow.runName": name, SWEEP_TAG: name, ROLE_TAG: "sweep", "lmpipe.kind": "sweep",
        **tags})
    _log_params(client, run.info.run_id, params)
    return SweepRuns(name, exp_id, run.info.run_id)


def add_child(client, runs: SweepRuns, name: str, role: str, params: dict[str, str],
              tags: dict[str, str], error: str | None = None) -> str:
    """A child of the sweep run for a point (or the base); a bad point is FAILED at once."""
    run = client.create_run(runs.experiment_id, run_name=name, tags={
        "mlflow.runName": name, "mlflow.parentRunId": runs.sweep_run_id, SWEEP_TAG: runs.name,
        ROLE_TAG: role, EXP_TAG: name, **tags})
    run_id = run.info.run_id
    _log_params(client, run_id, params)
    if error is not None:
        fail_run(client, run_id, 2, error)
    runs.children[name] = run_id
    return run_id


def _log_params(client, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param  # deferred: mlflow takes seconds to import

    items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])


def fail_run(client, run_id: str, exit_code: int | None, message: str,
             status: str = "FAILED") -> None:
    client.set_tag(run_id, EXIT_TAG, str(exit_code) if exit_code is not None else "none")
    client.set_tag(run_id, ERROR_TAG, message[:4000])  # the headline first, then the log
    client.set_terminated(run_id, status)


def begin_attempt(client, run_id: str, tags: dict[str, str]) -> int:
    """Mark the point's run RUNNING again for a new attempt; the stage runs a dead attempt
    left RUNNING become KILLED. Returns how many such runs were closed."""
    run = client.get_run(run_id)
    client.update_run(run_id, status="RUNNING")
    for k, v in tags.items():
        client.set_tag(run_id, k, v)
    stale = client.search_runs([run.info.experiment_id],
                               f"tags.`mlflow.parentRunId` = '{run_id}' "
                               "and attributes.status = 'RUNNING'")
    for child in stale:
        client.set_terminated(child.info.run_id, "KILLED")
    return len(stale)


# ----------------------------------------------------------------------------- reading
@dataclass
class PointRow:
    name: str
    status: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    run_id: str

    @property
    def experiment(self) -> str:
        return self.tags.get(EXP_TAG, self.name)


def find_sweep(client, experiment: str, name: str, required: bool = True):
    """The parent run of sweep `name` (or a run id) in `experiment`."""
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        found = client.search_runs([exp.experiment_id],
                                   f"tags.`{SWEEP_TAG}` = '{name}' and "
                                   f"tags.`{ROLE_TAG}` = 'sweep'", max_results=1)
        if found:
            return found[0]
    if required:
        raise InputError(f"no sweep named {name!r} in MLflow experiment {experiment!r} at "
                         f"{default_tracking_uri()} (set MLFLOW_TRACKING_URI to the store the "
                         "sweep used)")
    return None


def point_rows(client, sweep_run) -> list[PointRow]:
    """Every point of the sweep (the base left out), with its params, metrics and tags."""
    runs = client.search_runs([sweep_run.info.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{sweep_run.info.run_id}' and "
                              f"tags.`{ROLE_TAG}` = 'point'", max_results=10000)
    rows = [PointRow(r.data.tags.get("mlflow.runName", r.info.run_id), r.info.status,
                     dict(r.data.params), dict(r.data.metrics), dict(r.data.tags),
                     r.info.run_id) for r in runs]
    return sorted(rows, key=lambda r: r.name)


def default_target(keys: list[str], stages: list[str]) -> str | None:
    """The test bits per byte of the model the first swept section trains (the Transformer
    when that section trains none), or its val figure when the sweep stops before evaluate;
    None when the points run neither."""
    section = keys[0].split(".", 1)[0] if keys else "pretrain"
    model = next((m for m, s in MODEL_STAGE.items() if s == section), "transformer")
    if "evaluate" in stages:
        return f"evaluate.{model}.test_bpb"
    return f"{MODEL_STAGE[model]}.val_bpb" if MODEL_STAGE[model] in stages else None


def _candidates() -> list[tuple[str, str]]:
    cols = []
    for m in MODELS:
        cols += [(f"evaluate.{m}.test_bpb", f"{m} test_bpb"),
                 (f"{MODEL_STAGE[m]}.val_bpb", f"{m} val_bpb")]
    return cols + [(f"{s}.train_seconds", f"{s} train_s")
                   for s in dict.fromkeys(MODEL_STAGE.values())]


def _differs(rows: list[PointRow], get) -> bool:
    values = {get(r) for r in rows if get(r) is not None}
    return len(values) > 1 or (len(rows) == 1 and bool(values))


@dataclass
class SweepReport:
    rows: list[PointRow]          # best first; failed points last
    params: list[str]             # the swept params whose values differ
    metrics: list[tuple[str, str]]  # (key, label): the target first
    target: str
    maximize: bool

    @property
    def best(self) -> PointRow | None:
        first = self.rows[0] if self.rows else None
        return first if first is not None and self.target in first.metrics else None

    def markdown(self, title: str) -> str:
        head = ["point"] + self.params + [label for _, label in self.metrics] + ["status"]
        lines = [f"## {title}", "", "| " + " | ".join(head) + " |",
                 "|---" * len(head) + "|"]
        for r in self.rows:
            cells = [r.name] + [r.params.get(p, "") for p in self.params]
            cells += [_fmt(r.metrics.get(k)) for k, _ in self.metrics]
            status = "ok" if r.status == "FINISHED" and self.target in r.metrics else r.status
            if ERROR_TAG in r.tags:
                code = r.tags.get(EXIT_TAG, "none")
                status = (f"exit {code}: " if code != "none" else "failed: ") + \
                    (r.tags[ERROR_TAG].strip().splitlines() or [""])[0][:160]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells + [status])
                         + " |")
        return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "" if value is None else str(value)
    return f"{value:.1f}" if abs(value) >= 100 else f"{value:.4f}"


def build_report(rows: list[PointRow], target: str, maximize: bool = False) -> SweepReport:
    """The params that differ, the metrics that matter (test and val bits per byte per
    model, training seconds; constant ones left out), sorted by the target."""
    params = sorted({k for r in rows for k in r.params})
    params = [p for p in params if _differs(rows, lambda r, p=p: r.params.get(p))]
    labels = dict(_candidates())
    metrics = [(target, labels.get(target, target))]
    metrics += [(k, lab) for k, lab in _candidates() if k != target
                and _differs(rows, lambda r, k=k: r.metrics.get(k))]
    sign = -1.0 if maximize else 1.0

    def order(r: PointRow):
        value = r.metrics.get(target)
        done = value is not None and r.status == "FINISHED"
        return (0 if done else 1, sign * value if done else 0.0, r.name)

    return SweepReport(sorted(rows, key=order), params, metrics, target, maximize)


def sweep_report(client, experiment: str, name: str, target: str | None = None,
                 maximize: bool | None = None, out_dir: Path | None = None):
    """Read sweep `name`, write its table and figure to `out_dir`, log both to its parent
    run. Returns (the report, the markdown, the PNG path or None)."""
    parent = find_sweep(client, experiment, name)
    tags = parent.data.tags
    target = target or tags.get(TARGET_TAG) or "evaluate.transformer.test_bpb"
    if maximize is None:
        maximize = tags.get(MAXIMIZE_TAG, "false") == "true"
    report = build_report(point_rows(client, parent), target, maximize)
    done = sum(1 for r in report.rows if r.status == "FINISHED" and target in r.metrics)
    title = (f"sweep {name}: {done} of {len(report.rows)} points done, sorted by {target} "
             f"({'highest' if maximize else 'lowest'} first)")
    markdown = report.markdown(title)
    out_dir = out_dir or Path(os.getcwd())
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "report.md", markdown)
    png = None
    points = [(r.params, r.metrics[target]) for r in report.rows
              if r.status == "FINISHED" and target in r.metrics]
    if points and report.params:
        png = plot_sweep(points, report.params, target, out_dir / "report.png",
                         title=f"sweep {name}")
        client.log_artifact(parent.info.run_id, str(png), "sweep")
    client.log_artifact(parent.info.run_id, str(out_dir / "report.md"), "sweep")
    return report, markdown, png

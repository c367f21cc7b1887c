"""The pipeline-level MLflow run: what one execution of the pipeline left, in one run.

One run per execution, however it was started: the Prefect flow (pipeline/flow.py) opens it
for `lmpipe run`, the `params` stage for a plain `dvc repro` or `dvc exp run`
(lmpipe/tracking/execution.py), `lmpipe sync-mlflow` for work recorded afterwards. Every stage
run of the execution is its child.

It holds what tells two executions apart in MLflow's compare view ("show diff only"):
- params: the whole params.yaml, validated (defaults filled in, so an omitted key and its
  default compare equal) and flattened (`ngram.order`, `download.files.0.url`);
- metrics: every stage's final figures, `<stage>.<key>` (`ngram.val_bpb`,
  `evaluate.transformer.test_bpb`), read from metrics/*.json at the end, so stages DVC
  skipped or restored from its run cache are there too;
- tags: git commit and dirty flag, the DVC experiment name, the md5 of dvc.lock at the start
  and at the end (`lmpipe lineage` finds the run of a dvc.lock by it), the outcome;
- a name that says what changed: `exp NAME · ngram.order=5` (the params that differ from
  git HEAD's params.yaml);
- artifacts: dvc.lock, metrics/*.json and a summary table.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import yaml

from lmpipe.core.errors import InputError
from lmpipe.core.git import git, git_state
from lmpipe.core.metric_logger import MetricLogger, NullLogger, flatten, stage_logger
from lmpipe.core.names import DVC_EXP_NAME_ENV, PARENT_RUN_ENV
from lmpipe.core.params import Params, validate_params
from lmpipe.core.records import lock_md5, numeric_leaves, read_metrics

KIND_TAG = ("lmpipe.kind", "pipeline")
NAME_PARAMS = 3   # changed params spelled out in a run's name; the rest are counted

PREFERRED = ("test_bpb", "test_ppl", "val_bpb", "val_ppl", "val_loss", "train_seconds",
             "tokens_per_second", "params")


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4f}".rstrip("0").rstrip(".") if value != int(value) else f"{value:.1f}"
    return str(value)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _table(rows: list[tuple[str, dict]], first: str) -> str:
    cols: list[str] = [c for c in PREFERRED if any(c in r for _, r in rows)]
    extra = sorted({k for _, r in rows for k, v in r.items() if _is_number(v)} - set(cols))
    cols += extra
    lines = [f"| {first} | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows:
        lines.append(f"| {name} | " + " | ".join(_fmt(r[c]) if c in r else "" for c in cols)
                     + " |")
    return "\n".join(lines)


def metrics_markdown(metrics: dict[str, dict], stage_results: list[dict] | None = None) -> str:
    """The run's table: metrics/evaluate.json (one row per model) when present, else one row
    per stage from its metrics file."""
    parts = []
    evaluate = metrics.get("evaluate")
    if isinstance(evaluate, dict) and any(isinstance(v, dict) for v in evaluate.values()):
        rows = [(m, v) for m, v in evaluate.items() if isinstance(v, dict)]
        rows.sort(key=lambda r: (r[1].get("test_bpb", float("inf"))
                                 if _is_number(r[1].get("test_bpb")) else float("inf"), r[0]))
        parts += ["## lmpipe evaluation (metrics/evaluate.json)", "", _table(rows, "model")]
    else:
        rows = [(s, {k: v for k, v in m.items() if _is_number(v)})
                for s, m in metrics.items() if isinstance(m, dict)]
        if rows:
            parts += ["## lmpipe stage metrics (metrics/*.json)", "", _table(rows, "stage")]
        else:
            parts += ["## lmpipe run", "", "No metrics files yet."]
    if stage_results:
        parts += ["", "| stage | outcome | seconds |", "|---|---|---|"]
        for r in stage_results:
            parts.append(f"| {r['stage']} | {r['outcome']} | {_fmt(r.get('seconds'))} |")
    return "\n".join(parts) + "\n"


def finish_pipeline_run(run: MetricLogger, root: Path, results: list[dict] | None = None,
                        failures: dict[str, str] | None = None) -> tuple[str, str]:
    """Log dvc.lock, the metrics files, their numbers and the summary table to `run`; tag the
    outcome. Returns (the summary markdown, the md5 of dvc.lock)."""
    failures = failures or {}
    metrics = read_metrics(root)
    markdown = metrics_markdown(metrics, results)
    digest = lock_md5(root)
    if (root / "dvc.lock").exists():
        run.log_artifact(root / "dvc.lock")
    for path in sorted((root / "metrics").glob("*.json")):
        run.log_artifact(path, "metrics")
    run.log_metrics(numeric_leaves(metrics))
    run.log_text(markdown, "summary.md")
    run.set_tags({
        "dvc_lock_md5": digest,
        "dvc_lock_md5_end": digest,
        "lmpipe.outcome": "failed" if failures else "ok",
        "lmpipe.failed_stages": ",".join(failures) or "none",
    })
    return markdown, digest


# ----------------------------------------------------------------------------- opening
def run_params(params: Params | dict) -> dict[str, str]:
    """The whole params, flattened, as MLflow params (strings; `None` spelled `null`)."""
    data = params.model_dump(mode="json") if isinstance(params, Params) else params
    return {k: "null" if v is None else str(v) for k, v in flatten(data).items()}


def head_params(root: Path) -> dict[str, str]:
    """git HEAD's params.yaml as run_params gives it ({} outside git or when unreadable)."""
    text = git(root, "show", "HEAD:params.yaml")
    if not text:
        return {}
    try:
        return run_params(validate_params(yaml.safe_load(text), "HEAD:params.yaml"))
    except (InputError, yaml.YAMLError):
        return {}


def changed_params(now: dict[str, str], before: dict[str, str]) -> dict[str, str]:
    """The params of `now` that `before` lacks or holds with another value."""
    return {k: v for k, v in now.items() if before.get(k) != v}


def run_name(label: str, changed: dict[str, str], have_head: bool = True) -> str:
    """`exp NAME · ngram.order=5, seed=3 (+2 more)`: what the run is and what it changed."""
    if not have_head:
        return label
    if not changed:
        return f"{label} · HEAD params"
    shown = [f"{k}={v}" for k, v in list(changed.items())[:NAME_PARAMS]]
    more = len(changed) - NAME_PARAMS
    return f"{label} · {', '.join(shown)}" + (f" (+{more} more)" if more > 0 else "")


def open_pipeline_run(root: Path, experiment: str, label: str, params: Params | None,
                      tags: dict[str, str] | None = None) -> MetricLogger:
    """A new pipeline run (never the child of another), named and tagged, holding the whole
    params; a NullLogger when tracking is off or MLflow is down (one warning)."""
    stale = os.environ.pop(PARENT_RUN_ENV, None)
    try:
        run = stage_logger("pipeline", experiment=experiment)
    finally:
        if stale is not None:
            os.environ[PARENT_RUN_ENV] = stale
    if not getattr(run, "run_id", None):
        return NullLogger()
    now = run_params(params) if params is not None else {}
    before = head_params(root)
    run.set_tags({
        "mlflow.runName": run_name(label, changed_params(now, before), bool(before)),
        KIND_TAG[0]: KIND_TAG[1],
        "dvc_exp_name": os.environ.get(DVC_EXP_NAME_ENV, "none"),
        "dvc_lock_md5_start": lock_md5(root),
        **git_state(root),
        **(tags or {}),
    })
    run.log_params(now)
    return run

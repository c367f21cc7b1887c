"""The pipeline-level MLflow run: what one execution of the pipeline left, in one run.

The Prefect flow (pipeline/flow.py) opens it as the parent of every stage run; `lmpipe
sync-mlflow` writes one for work done outside the flow. Either way it ends holding dvc.lock,
every metrics/*.json (stages DVC restored from its run cache log nothing themselves), their
numbers and a summary table, tagged with the md5 of the dvc.lock it ended with, so that
`lmpipe lineage` finds the run that corresponds to a dvc.lock.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lmpipe.core.metric_logger import MetricLogger
from lmpipe.core.records import lock_md5, numeric_leaves, read_metrics

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
        "dvc_lock_md5_end": digest,
        "lmpipe.outcome": "failed" if failures else "ok",
        "lmpipe.failed_stages": ",".join(failures) or "none",
    })
    return markdown, digest

"""Two runs of the pipeline side by side: the params that differ, the metric deltas per
model (val and test bits per byte first), and both runs' loss curves on one figure.

A run is named as users know it:
- a DVC experiment (`dvc exp run -n baseline`): its commit under refs/exps;
- a git revision (`HEAD`, a branch, a tag, a sha): what was committed there;
- `workspace`: the files as they are now;
- an MLflow run id: a pipeline run (lmpipe/tracking/pipeline_run.py) holds the whole params
  and every stage's final metrics; its stage runs hold the loss curves.

For the first three, everything is read from files DVC keeps in git (params.yaml,
metrics/*.json and plots/<stage>/loss.csv are `cache: false`, so an experiment's commit holds
them), so a fresh clone compares without any MLflow store.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lmpipe.core.errors import InputError
from lmpipe.core.git import git
from lmpipe.core.metric_logger import default_tracking_uri
from lmpipe.core.names import MODEL_STAGE, MODELS, NEURAL_MODELS
from lmpipe.core.params import validate_params
from lmpipe.core.records import numeric_leaves, read_loss_csv, read_metrics
from lmpipe.tracking.pipeline_run import run_params

RUN_ID = re.compile(r"^[0-9a-f]{8,32}$")   # a full MLflow run id, or its first 8+ digits
WALL_CLOCK = re.compile(r"(seconds|per_second|peak_rss|elapsed)")
HEADLINE = ("val_bpb", "test_bpb")


@dataclass
class RunSide:
    """One side of a comparison: flat params, metrics per stage, loss rows per model."""

    name: str
    source: str                                   # what `name` resolved to, for the header
    params: dict[str, str]
    metrics: dict[str, dict]
    curves: dict[str, list[dict[str, float]]] = field(default_factory=dict)

    def model_metrics(self, model: str) -> dict[str, float]:
        """A model's figures: its training stage's metrics file, then evaluate's entry."""
        out = numeric_leaves(self.metrics.get(MODEL_STAGE[model]) or {})
        out.update(numeric_leaves((self.metrics.get("evaluate") or {}).get(model) or {}))
        return out


# ----------------------------------------------------------------------------- resolving
def exp_commits(root: Path) -> dict[str, str]:
    """{experiment name: commit} of the DVC experiments in this repo.

    An experiment is refs/exps/<2 hex>/<38 hex of its baseline>/<name>; DVC keeps its own
    bookkeeping under refs/exps too (refs/exps/exec/EXEC_HEAD, ...), which is not one."""
    out = {}
    for line in git(root, "for-each-ref", "--format=%(objectname) %(refname)",
                    "refs/exps").splitlines():
        sha, _, ref = line.partition(" ")
        parts = ref.split("/")
        if len(parts) == 5 and len(parts[2]) + len(parts[3]) == 40:
            out[parts[4]] = sha
    return out


def resolve(root: Path, name: str) -> RunSide:
    if name == "workspace":
        return _from_workspace(root)
    exps = exp_commits(root)
    if name in exps:
        return _from_commit(root, name, exps[name], f"DVC experiment {name} ({exps[name][:7]})")
    sha = git(root, "rev-parse", "--verify", "--quiet", f"{name}^{{commit}}")
    if sha:
        return _from_commit(root, name, sha, f"git {name} ({sha[:7]})")
    if RUN_ID.match(name):
        return _from_mlflow(root, name)
    known = ", ".join(sorted(exps)) or "none yet (`dvc exp run -n NAME`)"
    raise InputError(f"{name!r} is not a DVC experiment, a git revision or an MLflow run id; "
                     f"experiments here: {known}")


def _flat_params(raw, where: str) -> dict[str, str]:
    try:
        return run_params(validate_params(raw, where))
    except InputError:   # an old or broken params.yaml still compares, as written
        return run_params(raw if isinstance(raw, dict) else {})


def _from_workspace(root: Path) -> RunSide:
    raw = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))
    curves = {m: read_loss_csv(p) for m in NEURAL_MODELS
              if (p := root / "plots" / MODEL_STAGE[m] / "loss.csv").exists()}
    return RunSide("workspace", "the workspace", _flat_params(raw, "params.yaml"),
                   read_metrics(root), curves)


def _from_commit(root: Path, name: str, sha: str, source: str) -> RunSide:
    raw = yaml.safe_load(git(root, "show", f"{sha}:params.yaml") or "{}")
    metrics = {}
    for path in git(root, "ls-tree", "--name-only", sha, "metrics/").splitlines():
        if path.endswith(".json"):
            try:
                metrics[Path(path).stem] = json.loads(git(root, "show", f"{sha}:{path}"))
            except ValueError:
                continue
    curves = {}
    for m in NEURAL_MODELS:
        text = git(root, "show", f"{sha}:plots/{MODEL_STAGE[m]}/loss.csv")
        if text:
            curves[m] = [{k: float(v) for k, v in row.items() if v not in ("", None)}
                         for row in csv.DictReader(io.StringIO(text))]
    return RunSide(name, source, _flat_params(raw, f"{sha[:7]}:params.yaml"), metrics, curves)


def _full_run_id(client, prefix: str) -> str:
    """The one run whose id starts with `prefix` (the tables print 8 digits of it)."""
    ids = [r.info.run_id for exp in client.search_experiments()
           for r in client.search_runs([exp.experiment_id], max_results=50000)
           if r.info.run_id.startswith(prefix)]
    if len(ids) != 1:
        raise InputError(f"MLflow run {prefix}: {'not found' if not ids else 'ambiguous'} "
                         f"({len(ids)} runs start with it"
                         f"{': ' + ', '.join(ids[:5]) if ids else ''})")
    return ids[0]


def _from_mlflow(root: Path, run_id: str) -> RunSide:
    # deferred: mlflow takes seconds to import; only MLflow run ids need it
    from mlflow.tracking import MlflowClient

    client = MlflowClient(default_tracking_uri())
    if len(run_id) < 32:
        run_id = _full_run_id(client, run_id)
    try:
        run = client.get_run(run_id)
    except Exception as err:
        raise InputError(f"MLflow run {run_id}: not found ({type(err).__name__})") from None
    metrics: dict[str, dict] = {}
    for key, value in run.data.metrics.items():
        stage, _, rest = key.partition(".")
        node = metrics.setdefault(stage, {})
        *parents, leaf = rest.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    curves = {}
    children = client.search_runs([run.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{run_id}'")
    for child in children:
        stage = child.data.tags.get("dvc_stage")
        model = next((m for m, s in MODEL_STAGE.items() if s == stage and m in NEURAL_MODELS), None)
        if model:
            rows: dict[int, dict] = {}
            for col in ("train_loss", "val_loss"):
                for point in client.get_metric_history(child.info.run_id, col):
                    rows.setdefault(point.step, {"step": float(point.step)})[col] = point.value
            curves[model] = [rows[s] for s in sorted(rows)]
    name = run.data.tags.get("mlflow.runName", run_id)
    return RunSide(run_id, f"MLflow run {run_id[:8]} ({name})", dict(run.data.params), metrics,
                   curves)


# ----------------------------------------------------------------------------- comparing
def compare(a: RunSide, b: RunSide, *, wall_clock: bool = False) -> dict:
    """The differences, as data: params, per-model metrics (headline first), other metrics."""
    params = {k: (a.params.get(k), b.params.get(k))
              for k in sorted(set(a.params) | set(b.params)) if a.params.get(k) != b.params.get(k)}
    models = {}
    for m in MODELS:
        ma, mb = a.model_metrics(m), b.model_metrics(m)
        keys = [k for k in HEADLINE if k in ma or k in mb]
        keys += sorted(k for k in set(ma) | set(mb) if k not in HEADLINE and k.endswith(("bpb", "ppl"))
                       and ma.get(k) != mb.get(k))
        if keys:
            models[m] = {k: _delta(ma.get(k), mb.get(k)) for k in keys}
    la, lb = numeric_leaves(a.metrics), numeric_leaves(b.metrics)
    other = {k: _delta(la.get(k), lb.get(k)) for k in sorted(set(la) | set(lb))
             if la.get(k) != lb.get(k) and (wall_clock or not WALL_CLOCK.search(k))
             and not k.startswith("evaluate.")}
    return {"a": {"name": a.name, "source": a.source}, "b": {"name": b.name, "source": b.source},
            "params": params, "models": models, "other_metrics": other}


def _delta(x: float | None, y: float | None) -> dict:
    d = None if x is None or y is None else y - x
    return {"a": x, "b": y, "delta": d}


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}" if abs(v) < 1e4 else f"{v:,.0f}"


def format_comparison(result: dict, figure: Path | None) -> str:
    a, b = result["a"], result["b"]
    lines = [f"A = {a['source']}", f"B = {b['source']}", ""]
    lines.append(f"params that differ ({len(result['params'])}):")
    width = max((len(k) for k in result["params"]), default=0)
    for k, (x, y) in result["params"].items():
        lines.append(f"  {k:<{width}}  {x if x is not None else '(absent)'} -> "
                     f"{y if y is not None else '(absent)'}")
    if not result["params"]:
        lines.append("  none")
    lines += ["", "per model (bits per byte first; lower is better)",
              f"  {'model':<12} {'metric':<24} {'A':>10} {'B':>10} {'B - A':>10}"]
    for m, rows in result["models"].items():
        for k, v in rows.items():
            d = "-" if v["delta"] is None else f"{v['delta']:+.4f}"
            lines.append(f"  {m:<12} {k:<24} {_num(v['a']):>10} {_num(v['b']):>10} {d:>10}")
    if not result["models"]:
        lines.append("  no model metrics on either side (has the pipeline run there?)")
    other = result["other_metrics"]
    lines += ["", f"other metrics that differ ({len(other)}; wall-clock fields left out "
              "unless --wall-clock):"]
    for k, v in other.items():
        d = "-" if v["delta"] is None else f"{v['delta']:+.4g}"
        lines.append(f"  {k:<40} {_num(v['a']):>12} {_num(v['b']):>12} {d:>10}")
    if figure is not None:
        lines += ["", f"loss curves of both runs: {figure}"]
    return "\n".join(lines)

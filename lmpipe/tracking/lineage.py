"""Lineage from dvc.lock: which stages, commands, inputs and params produced an artifact.

dvc.lock is the record (DVC writes it after every stage): each stage's command, the md5 of
every dep and out, and its resolved params. A chain is built by matching each stage's deps to
the outs of other stages, down to the stages that read nothing DVC produced (`download`), whose
source checksums (sha256) close the chain. MLflow runs are matched by their `dvc_stage` and
`git_commit` tags, and the pipeline run whose end state is this exact dvc.lock is named.

`verify()` asks DVC itself whether the files on disk still match dvc.lock
(`dvc data status --granular` re-hashes files inside directories the way DVC does, and
`dvc status` covers uncached outs such as metrics files and stale stages).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from lmpipe.core.dvc_cli import run_dvc
from lmpipe.core.errors import InputError
from lmpipe.core.git import git
from lmpipe.core.metric_logger import default_tracking_uri
from lmpipe.core.names import CHECK_STAGE, MODELS, STAGES
from lmpipe.core.params import tracking_experiment
from lmpipe.core.records import lock_md5, read_lock

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


# ----------------------------------------------------------------------------- dvc.lock
def _norm(path: str) -> str:
    return os.path.normpath(path).replace(os.sep, "/").rstrip("/")


def _inside(path: str, folder: str) -> bool:
    path, folder = _norm(path), _norm(folder)
    return path == folder or path.startswith(folder + "/")


def producer_of(lock: dict[str, dict], path: str) -> tuple[str, str] | None:
    """(stage, out path) of the out that is `path` or contains it."""
    best = None
    for stage, entry in lock.items():
        for out in entry.get("outs") or []:
            if _inside(path, out["path"]):
                if best is None or len(out["path"]) > len(best[1]):
                    best = (stage, out["path"])
    return best


def produced_under(lock: dict[str, dict], folder: str) -> list[tuple[str, str]]:
    """Outs inside `folder` (for a PATH such as `data/models` that no single out covers)."""
    return [(s, o["path"]) for s, e in lock.items() for o in e.get("outs") or []
            if _inside(o["path"], folder)]


def upstream_of(lock: dict[str, dict], stage: str) -> set[str]:
    """The stages whose outs `stage` reads. The `params` check is left out: every stage
    depends on its constant file only so that DVC runs it first; no data comes from it."""
    ups = set()
    for dep in lock.get(stage, {}).get("deps") or []:
        found = producer_of(lock, dep["path"])
        if found and found[0] not in (stage, CHECK_STAGE):
            ups.add(found[0])
        # a dep that is a folder holding several outs (rare): all their producers
        for s, _ in produced_under(lock, dep["path"]):
            if s not in (stage, CHECK_STAGE):
                ups.add(s)
    return ups


def chain_of(lock: dict[str, dict], stages: list[str]) -> list[str]:
    """`stages` and everything upstream, upstream first (ties broken by STAGES order)."""
    seen: set[str] = set()
    todo = list(stages)
    while todo:
        s = todo.pop()
        if s in seen:
            continue
        seen.add(s)
        todo.extend(upstream_of(lock, s))
    ups = {s: upstream_of(lock, s) & seen for s in seen}
    order: list[str] = []
    key = lambda n: (STAGES.index(n) if n in STAGES else len(STAGES), n)  # noqa: E731
    while len(order) < len(seen):
        ready = sorted((n for n in seen - set(order) if ups[n] <= set(order)), key=key)
        if not ready:  # pragma: no cover - dvc.lock cannot hold a cycle
            ready = sorted(seen - set(order), key=key)
        order.append(ready[0])
    return order


# ----------------------------------------------------------------------------- git / mlflow
def git_info(root: Path) -> dict[str, Any]:
    head = git(root, "rev-parse", "HEAD")
    lock_commit = git(root, "log", "-1", "--format=%H", "--", "dvc.lock")
    dirty = bool(git(root, "status", "--porcelain", "--", "dvc.lock"))
    return {"head": head or None, "dvc_lock_commit": lock_commit or None,
            "dvc_lock_uncommitted": dirty}


def _find_sha256(obj: Any, found: list[str]) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, str) and "sha256" in str(k).lower() and re.fullmatch(
                    r"[0-9a-f]{64}", v):
                found.append(v)
            else:
                _find_sha256(v, found)
    elif isinstance(obj, list):
        for v in obj:
            _find_sha256(v, found)


def source_checksums(root: Path, stage: str, entry: dict) -> list[str]:
    """sha256 of the raw inputs a root stage read: from its params in dvc.lock, its metrics
    file and any source.json among its outs."""
    found: list[str] = []
    _find_sha256(entry.get("params") or {}, found)
    metrics = root / "metrics" / f"{stage}.json"
    for path in [metrics] + [root / o["path"] / "source.json" for o in entry.get("outs") or []]:
        if path.is_file():
            try:
                _find_sha256(json.loads(path.read_text(encoding="utf-8")), found)
            except (OSError, ValueError):
                pass
    return sorted(dict.fromkeys(found))


class Runs:
    """MLflow lookups by tag; silent (empty) when MLflow is unreachable."""

    def __init__(self, tracking_uri: str | None, experiment: str):
        self.error: str | None = None
        self.client = None
        self.exp_ids: list[str] = []
        try:
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            logging.getLogger("alembic").setLevel(logging.WARNING)
            from mlflow.tracking import (
                MlflowClient,  # deferred: mlflow takes seconds to import
            )

            self.client = MlflowClient(tracking_uri=tracking_uri or default_tracking_uri())
            exp = self.client.get_experiment_by_name(experiment)
            self.exp_ids = [exp.experiment_id] if exp else []
        except Exception as err:  # pragma: no cover - depends on the store
            self.error = f"{type(err).__name__}: {err}"

    def search(self, filter_string: str, max_results: int = 20) -> list:
        if not self.client or not self.exp_ids:
            return []
        try:
            return self.client.search_runs(self.exp_ids, filter_string,
                                           order_by=["attributes.start_time DESC"],
                                           max_results=max_results)
        except Exception as err:  # pragma: no cover
            self.error = f"{type(err).__name__}: {err}"
            return []

    def get(self, run_id: str):
        if not self.client:
            return None
        try:
            return self.client.get_run(run_id)
        except Exception:
            return None


def _run_summary(run) -> dict[str, Any]:
    t = run.data.tags
    return {"run_id": run.info.run_id, "status": run.info.status,
            "git_commit": t.get("git_commit"), "parent_run_id": t.get("mlflow.parentRunId"),
            "start_time": run.info.start_time}


# ----------------------------------------------------------------------------- lineage
def resolve_target(root: Path, lock: dict[str, dict], target: str, runs: Runs | None
                   ) -> tuple[list[str], dict[str, Any]]:
    """Stages whose chains answer `target` (a path, a model name or an MLflow run id)."""
    if target in MODELS:
        rel = f"data/models/{target}"
        found = producer_of(lock, rel) or next(iter(produced_under(lock, rel)), None)
        if not found:
            raise InputError(f"model {target!r}: {rel} is not an out in dvc.lock "
                             f"(has its stage run?)")
        return [found[0]], {"kind": "model", "path": found[1]}
    if _RUN_ID.match(target) and runs is not None:
        run = runs.get(target)
        if run is not None:
            tags = run.data.tags
            stage = tags.get("dvc_stage")
            if tags.get("lmpipe.kind") == "pipeline" or stage == "pipeline":
                return list(lock), {"kind": "pipeline run", "run_id": target}
            if stage in lock:
                return [stage], {"kind": "stage run", "run_id": target}
            raise InputError(f"MLflow run {target} has dvc_stage={stage!r}, not in dvc.lock")
    path = Path(target)
    if path.is_absolute():
        try:
            path = path.resolve().relative_to(root.resolve())
        except ValueError:
            raise InputError(f"{target}: outside the project at {root}") from None
    rel = _norm(str(path))
    found = producer_of(lock, rel)
    if found:
        return [found[0]], {"kind": "path", "path": rel, "out": found[1]}
    under = produced_under(lock, rel)
    if under:
        return sorted({s for s, _ in under}), {"kind": "folder", "path": rel}
    raise InputError(f"{target}: not a DVC out in dvc.lock, a model name "
                     f"({', '.join(MODELS)}) or an MLflow run id")


def lineage(root: Path, target: str, tracking_uri: str | None = None,
            experiment: str | None = None, with_mlflow: bool = True) -> dict[str, Any]:
    root = Path(root)
    lock = read_lock(root)
    if experiment is None:
        experiment = tracking_experiment(root)
    runs = Runs(tracking_uri, experiment) if with_mlflow else None
    stages, what = resolve_target(root, lock, target, runs)
    git_report = git_info(root)
    lock_digest = lock_md5(root)
    commits = {c for c in (git_report["head"], git_report["dvc_lock_commit"]) if c}
    pipeline_run = None
    if runs is not None:
        found = runs.search(f"tags.dvc_lock_md5_end = '{lock_digest}'", 1)
        pipeline_run = _run_summary(found[0]) if found else None
    chain = []
    for stage in chain_of(lock, stages):
        entry = lock[stage]
        node: dict[str, Any] = {
            "stage": stage,
            "cmd": entry.get("cmd"),
            "deps": [{"path": d["path"], "md5": d.get("md5")} for d in entry.get("deps") or []],
            "outs": [{"path": o["path"], "md5": o.get("md5")} for o in entry.get("outs") or []],
            "params": entry.get("params") or {},
            "upstream": sorted(upstream_of(lock, stage)),
        }
        if not node["upstream"]:
            node["source_sha256"] = source_checksums(root, stage, entry)
        if runs is not None:
            stage_runs = [_run_summary(r) for r in
                          runs.search(f"tags.dvc_stage = '{stage}'", 50)]
            matching = [r for r in stage_runs if r["git_commit"] in commits] or stage_runs[:1]
            node["mlflow_runs"] = matching[:5]
            if pipeline_run:
                node["in_pipeline_run"] = any(
                    r["parent_run_id"] == pipeline_run["run_id"] for r in stage_runs)
        chain.append(node)
    out = {"target": target, **what, "root": str(root), "dvc_lock_md5": lock_digest,
           "git": git_report, "pipeline_run": pipeline_run, "chain": chain}
    if runs is not None and runs.error:
        out["mlflow_error"] = runs.error
    return out


def render(report: dict[str, Any]) -> str:
    lines = [f"lineage of {report['target']} ({report.get('kind')})",
             f"  dvc.lock md5 {report['dvc_lock_md5']}; git HEAD {report['git']['head']}; "
             f"dvc.lock last committed in {report['git']['dvc_lock_commit']}"
             + (" (working copy differs)" if report["git"]["dvc_lock_uncommitted"] else "")]
    if report.get("pipeline_run"):
        lines.append(f"  pipeline run that wrote this dvc.lock: "
                     f"{report['pipeline_run']['run_id']}")
    if report.get("mlflow_error"):
        lines.append(f"  (MLflow unavailable: {report['mlflow_error']})")
    for node in report["chain"]:
        ups = f" <- {', '.join(node['upstream'])}" if node["upstream"] else ""
        lines += ["", f"[{node['stage']}]{ups}", f"  cmd: {node['cmd']}"]
        for d in node["deps"]:
            lines.append(f"  dep  {d['md5']}  {d['path']}")
        for o in node["outs"]:
            lines.append(f"  out  {o['md5']}  {o['path']}")
        for file, values in (node["params"] or {}).items():
            flat = _flatten(values)
            shown = ", ".join(f"{k}={_short(v)}" for k, v in list(flat.items())[:12])
            more = f" (+{len(flat) - 12} more)" if len(flat) > 12 else ""
            lines.append(f"  params ({file}): {shown}{more}")
        if "source_sha256" in node:
            lines.append("  source sha256: " + (", ".join(node["source_sha256"]) or "none found"))
        for r in node.get("mlflow_runs") or []:
            lines.append(f"  mlflow run {r['run_id']} ({r['status']}, commit "
                         f"{(r['git_commit'] or '?')[:12]})")
    return "\n".join(lines) + "\n"


def _short(value: Any, width: int = 60) -> str:
    text = str(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): obj}


# ----------------------------------------------------------------------------- verify
def _dvc_json(root: Path, *args: str) -> Any:
    text = run_dvc(root, *args).stdout.strip()
    start = text.find("{")
    return json.loads(text[start:]) if start >= 0 else {}


def verify(root: Path) -> dict[str, Any]:
    """Files that no longer match dvc.lock (modified/deleted) and stages DVC finds stale."""
    root = Path(root)
    read_lock(root)  # a clear error when there is none
    data = _dvc_json(root, "data", "status", "--granular", "--json")
    status = _dvc_json(root, "status", "--json")
    unc = data.get("uncommitted") or {}
    problems: list[dict[str, str]] = []
    seen: set[str] = set()
    for kind in ("modified", "deleted", "added", "renamed"):
        for item in unc.get(kind) or []:
            path = item if isinstance(item, str) else json.dumps(item)
            if path.endswith("/"):
                continue  # the folder itself: its files are listed one by one
            seen.add(_norm(path))
            problems.append({"path": path, "problem": kind})
    lock = read_lock(root)
    stale: dict[str, list[str]] = {}
    not_run: list[str] = []
    for stage, changes in (status or {}).items():
        if stage.split(":")[-1] not in lock and stage not in lock:
            not_run.append(stage)  # never recorded (not run yet, or it failed): nothing to match
            continue
        for change in changes if isinstance(changes, list) else []:
            if not isinstance(change, dict):
                stale.setdefault(stage, []).append(str(change))
                continue
            for key, detail in change.items():
                if key == "changed outs" and isinstance(detail, dict):
                    for path, how in detail.items():
                        covered = any(_inside(s, path) for s in seen)
                        if not covered:
                            seen.add(_norm(path))
                            problems.append({"path": path, "problem": how, "stage": stage})
                elif isinstance(detail, dict):
                    stale.setdefault(stage, []).extend(
                        f"{key}: {p} ({how})" for p, how in detail.items())
                else:
                    stale.setdefault(stage, []).append(f"{key}")
    for p in problems:
        if "stage" not in p:
            found = producer_of(lock, p["path"])
            if found:
                p["stage"] = found[0]
    return {"ok": not problems and not stale, "files": problems, "stale": stale,
            "not_run": not_run}


def render_verify(report: dict[str, Any]) -> str:
    lines = []
    if report.get("not_run"):
        lines.append("not in dvc.lock yet (never completed), not checked: "
                     + ", ".join(report["not_run"]))
    if report["ok"]:
        lines.append("lineage verify: every DVC out matches dvc.lock and no stage is stale")
        return "\n".join(lines) + "\n"
    for p in report["files"]:
        lines.append(f"MISMATCH {p['path']}: {p['problem']} (out of stage "
                     f"{p.get('stage', '?')}; does not match dvc.lock)")
    for stage, why in report["stale"].items():
        lines.append(f"STALE {stage}: " + "; ".join(why))
    return "\n".join(lines) + "\n"

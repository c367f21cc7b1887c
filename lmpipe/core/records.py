"""The files a pipeline run leaves as its record, read and written in one place.

    dvc.lock                    DVC's record of every stage: command, dep/out md5s, params
    dvc.yaml                    the stage graph as declared (deps, outs)
    metrics/<stage>.json        each stage's figures (the source of truth; MLflow mirrors them)
    plots/<stage>/loss.csv      per-step loss of a training stage (drawn by `dvc plots`)

Lineage, the model registry, MLflow replay, the Prefect flow and the report all read these
through this module, so a change of layout is made once.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from lmpipe.core.errors import InputError
from lmpipe.core.files import md5_file, write_json_atomic, write_text_atomic
from lmpipe.core.paths import metrics_path, project_root


# ----------------------------------------------------------------------------- dvc.lock
def read_lock(root: Path | None = None, *, required: bool = True) -> dict[str, dict]:
    """The `stages:` mapping of dvc.lock. Missing: InputError when `required`, else {}."""
    path = (root or project_root()) / "dvc.lock"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        if required:
            raise InputError(f"{path}: no dvc.lock yet; run the pipeline first (`lmpipe run`)")
        return {}
    except OSError as err:
        raise InputError(f"{path}: cannot read it ({err})") from None
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML: {err}") from None
    stages = data.get("stages") if isinstance(data, dict) else None
    if stages is None:
        return {}
    if not isinstance(stages, dict):
        raise InputError(f"{path}: `stages:` is not a mapping")
    return stages


def lock_md5(root: Path | None = None) -> str:
    """md5 of dvc.lock itself ('none' when there is none): names one state of the pipeline."""
    path = (root or project_root()) / "dvc.lock"
    return md5_file(path) if path.exists() else "none"


def lock_outs(lock: Mapping[str, dict]) -> dict[str, str]:
    """{out path: md5} of every stage (a folder's md5 is DVC's `.dir` md5)."""
    return {o["path"].rstrip("/"): o.get("md5", "")
            for entry in lock.values() for o in entry.get("outs") or []}


def lock_out_md5(lock: Mapping[str, dict], path: str) -> str | None:
    return lock_outs(lock).get(path.rstrip("/")) or None


def read_dvc_yaml(root: Path | None = None) -> dict[str, dict]:
    """The `stages:` mapping of dvc.yaml ({} when there is none)."""
    path = (root or project_root()) / "dvc.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        return {}
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML: {err}") from None
    return data.get("stages") or {}


def declared_deps(stage_spec: Mapping[str, Any]) -> list[str]:
    """The dep paths of one dvc.yaml stage (entries may be plain strings or one-key maps)."""
    return [d if isinstance(d, str) else next(iter(d)) for d in stage_spec.get("deps") or []]


# ----------------------------------------------------------------------------- metrics files
def write_metrics(stage: str, metrics: Mapping[str, Any]) -> dict:
    """Write metrics/<stage>.json (sorted keys; non-finite floats as strings, which JSON lacks)."""
    clean = {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v)
             for k, v in metrics.items()}
    write_json_atomic(metrics_path(stage), clean)
    return clean


def read_stage_metrics(stage: str, root: Path | None = None) -> dict[str, Any]:
    """metrics/<stage>.json ({} when the stage has not written one)."""
    return read_json((root or project_root()) / "metrics" / f"{stage}.json")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path` ({} when missing; InputError naming the file when invalid)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: not valid JSON ({err})") from None
    return data if isinstance(data, dict) else {}


def read_metrics(root: Path | None = None) -> dict[str, dict]:
    """Every metrics/<stage>.json, keyed by stage; unreadable files are left out."""
    out = {}
    for path in sorted(((root or project_root()) / "metrics").glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            out[path.stem] = data
    return out


def numeric_leaves(obj: Any, prefix: str = "") -> dict[str, float]:
    """{'a.b': 1.0} for every finite number inside nested dicts (bools are not numbers)."""
    out: dict[str, float] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            out.update(numeric_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool) and math.isfinite(obj):
        out[prefix] = float(obj)
    return out


# ----------------------------------------------------------------------------- loss.csv
# One row per optimizer step. val_loss is filled on the steps where it was measured and
# empty elsewhere (Vega-Lite, behind `dvc plots`, skips the empty cells).
LOSS_COLUMNS = ("step", "tokens", "train_loss", "val_loss", "lr")


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def write_loss_csv(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    return write_csv(path, LOSS_COLUMNS, rows)


def write_csv(path: str | Path, columns: Iterable[str], rows: Iterable[Mapping[str, Any]]) -> Path:
    """A CSV for `dvc plots` (one row per record, empty cells for missing values), atomically."""
    columns = list(columns)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for row in rows:
        w.writerow([_cell(row.get(c)) for c in columns])
    write_text_atomic(path, buf.getvalue())
    return Path(path)


def read_loss_csv(path: str | Path) -> list[dict[str, float]]:
    """The rows of a loss.csv with their measured cells only (empty cells left out).

    A malformed file raises InputError naming the file and line."""
    path = Path(path)
    rows = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if "step" not in (reader.fieldnames or []):
                raise InputError(f"{path}: line 1: no `step` column (header {reader.fieldnames})")
            for row in reader:
                try:
                    if not row.get("step"):
                        raise ValueError("empty `step` cell")
                    rows.append({k: float(v) for k, v in row.items()
                                 if k is not None and v not in ("", None)})
                except (TypeError, ValueError) as err:
                    raise InputError(f"{path}: line {reader.line_num}: {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read it ({type(err).__name__}: {err})") from None
    return rows

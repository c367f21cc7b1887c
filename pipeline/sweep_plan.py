"""What a sweep runs: its points, the stages they share, and the names DVC and MLflow know.

    plan = plan_sweep(root, "lr", ["pretrain.train.lr=0.003,0.006"], params_file=None)
    plan.points        # [Point("lr-1", ("pretrain.train.lr=0.003",)), Point("lr-2", ...)]
    plan.shared        # download, tokenizer, ngram, rnn: run once, in the experiment lr-base

- The grid is DVC's own expansion of `-S` (Hydra's sweep syntax, what `dvc exp run --queue
  -S` queues): `key=a,b`, `key=range(1,4)`, `key=choice(a,b)`; a list `key=[1,2]` is one
  value. A params file adds explicit sets (a YAML or JSON list of mappings); with both, every
  set of the file is combined with every point of the grid.
- A point whose overrides do not apply to params.yaml at the sweep's commit (an unknown key:
  DVC refuses `-S` on keys that do not exist, as Hydra does) is a bad point: exit 2 for it
  alone, never submitted. A value out of range is left to the stage, which exits 2 naming
  the key, on the worker (the stages validate params; the sweep does not second-guess them).
- Shared stages are those no swept key reaches: a stage is *affected* when one of its params
  entries in dvc.yaml contains (or is contained in) a swept key, and so is everything
  downstream of it. The shared stages run once, in the sweep's base experiment, and every
  point starts from that experiment (so download and tokenizer run once per sweep).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from dvc.exceptions import DvcException
from dvc.utils.cli_parse import to_path_overrides
from dvc.utils.hydra import apply_overrides, get_hydra_sweeps

from lmpipe.core.errors import InputError
from lmpipe.core.names import CHECK_STAGE
from lmpipe.core.params import read_yaml
from lmpipe.core.records import read_dvc_yaml
from pipeline.graph import StageGraph, read_stage_graph

PARAMS_FILE = "params.yaml"  # DVC's default params file: overrides without `file:` go there
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


@dataclass(frozen=True)
class Point:
    """One point of a sweep: a DVC experiment named `name`, run with `-S` `overrides`."""

    name: str
    overrides: tuple[str, ...]
    error: str | None = None  # why the overrides cannot apply (a bad point: exit 2)

    @property
    def values(self) -> dict[str, str]:
        """{key: value as written}: the point's params as MLflow shows them."""
        out = {}
        for o in self.overrides:
            key, _, value = o.partition("=")
            out[key.split(":", 1)[-1]] = value
        return out


@dataclass
class SweepPlan:
    name: str
    commit: str
    points: list[Point]
    stages: list[str]            # every stage a point runs or reads, upstream first
    affected: list[str]          # what the swept keys change: run by every point
    shared: list[str]            # what they do not: run once, in the base experiment
    targets: list[str] | None = None
    keys: list[str] = field(default_factory=list)

    @property
    def base(self) -> str | None:
        """The experiment holding the shared stages (None when nothing is shared)."""
        return f"{self.name}-base" if self.shared else None

    @property
    def good(self) -> list[Point]:
        return [p for p in self.points if p.error is None]


# ----------------------------------------------------------------------------- names
def default_name() -> str:
    return time.strftime("sweep-%Y%m%d-%H%M%S")


def check_name(name: str) -> str:
    """Sweep names become git refs (DVC experiments) and Prefect deployment names."""
    if not _NAME.match(name) or ".." in name or name.endswith((".", ".lock")):
        raise InputError(f"--name: {name!r} is not a usable sweep name (letters, digits, '.', "
                         "'_', '-'; at most 63 characters, starting with a letter or digit)")
    return name


# ----------------------------------------------------------------------------- the grid
def _as_set_args(path_overrides: dict[str, list[str]]) -> tuple[str, ...]:
    return tuple(o if path == PARAMS_FILE else f"{path}:{o}"
                 for path, overrides in path_overrides.items() for o in overrides)


def expand_grid(set_args: list[str]) -> list[tuple[str, ...]]:
    """`-S` arguments -> one tuple of `-S` arguments per point (DVC's expansion)."""
    if not set_args:
        return [()]
    for arg in set_args:
        if "=" not in arg:
            raise InputError(f"-S {arg}: expected KEY=VALUE[,VALUE...]")
    try:
        sweeps = get_hydra_sweeps(to_path_overrides(set_args))
    except (DvcException, ValueError) as err:
        raise InputError(f"-S {' '.join(set_args)}: {err}") from None
    except Exception as err:  # Hydra's grammar errors (OverrideParseException, ...)
        detail = str(err).strip().partition("\n")[0]
        raise InputError(f"-S: {detail}") from None
    return [_as_set_args(s) for s in sweeps]


def hydra_value(value: Any) -> str:
    """A YAML value written as a Hydra override value (what `-S key=VALUE` parses back)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in mapping.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def read_param_sets(path: str | Path) -> list[tuple[str, ...]]:
    """A YAML/JSON list of mappings (`{pretrain.train.lr: 0.003}` or nested) -> `-S` tuples.

    Errors name the file and the line of the item at fault (exit 2)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--params-file: {path}: file not found")
    data = read_yaml(path)  # InputError with the line on invalid YAML
    if not isinstance(data, list) or not data:
        raise InputError(f"{path}: expected a non-empty list of param sets (mappings of "
                         f"KEY: VALUE), got {type(data).__name__}")
    lines = [n.start_mark.line + 1 for n in yaml.compose(path.read_text()).value]
    sets = []
    for i, (item, line) in enumerate(zip(data, lines), start=1):
        if not isinstance(item, dict) or not item:
            raise InputError(f"{path}: line {line}: param set {i} is not a mapping of "
                             f"KEY: VALUE, got {item!r}")
        sets.append(tuple(f"{k}={hydra_value(v)}" for k, v in _flatten(item).items()))
    return sets


def combine(file_sets: list[tuple[str, ...]], grid: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """Every set of the file with every point of the grid (a key set by both: the grid's)."""
    out = []
    for fs in file_sets or [()]:
        for gs in grid:
            keys = {o.split("=", 1)[0] for o in gs}
            out.append(tuple(o for o in fs if o.split("=", 1)[0] not in keys) + gs)
    return out


# ----------------------------------------------------------------------------- checking
def file_at(root: Path, commit: str, name: str) -> str | None:
    proc = subprocess.run(["git", "show", f"{commit}:{name}"], cwd=root, capture_output=True,
                          text=True)
    return proc.stdout if proc.returncode == 0 else None


def override_error(root: Path, commit: str, overrides: tuple[str, ...]) -> str | None:
    """Why `overrides` cannot apply to the params files at `commit` (None: they apply).

    DVC's own `-S` code applies them to a copy, so the answer is the one a worker's `dvc exp
    run -S` would give, minutes later."""
    with tempfile.TemporaryDirectory(prefix="lmpipe-sweep-") as tmp:
        for path, items in to_path_overrides(list(overrides)).items():
            text = file_at(root, commit, path)
            if text is None:
                return f"{path}: not in commit {commit[:12]}"
            copy = Path(tmp) / Path(path).name
            copy.write_text(text, encoding="utf-8")
            try:
                apply_overrides(copy, items)
            except Exception as err:  # DVC wraps Hydra's error; its cause names the key
                first = str(err.__cause__ or err).strip().partition("\n")[0]
                if first.startswith("Could not override"):
                    first += f" {path} has no such key at commit {commit[:12]}"
                return f"{path}: {first}"
    return None


# ----------------------------------------------------------------------------- stages
def swept_keys(points: list[tuple[str, ...]]) -> list[str]:
    keys: list[str] = []
    for overrides in points:
        for o in overrides:
            key = o.partition("=")[0].split(":", 1)[-1].lstrip("+~")
            if key not in keys:
                keys.append(key)
    return keys


def _reads(entry: Any, key: str) -> bool:
    """Whether one `params:` entry of a dvc.yaml stage covers `key` (or a part of it)."""
    if isinstance(entry, str):
        names = [entry]
    elif isinstance(entry, dict):  # {params file: [keys]}
        names = [k for v in entry.values() for k in (v or [])]
    else:
        names = []
    return any(key == n or key.startswith(n + ".") or n.startswith(key + ".") for n in names)


def split_stages(graph: StageGraph, dvc_yaml: dict[str, dict], keys: list[str],
                 closure: list[str]) -> tuple[list[str], list[str]]:
    """(affected, shared) among `closure`: what a swept key reaches, downstream included.
    The params check is in neither: DVC runs it before anything else wherever it runs (it
    reads the whole file), and its out never changes, so it decides nothing about sharing."""
    closure = [s for s in closure if s.split("@")[0] != CHECK_STAGE]
    direct = {s for s in closure
              if any(_reads(e, k) for e in (dvc_yaml.get(s.split("@")[0]) or {}).get("params")
                     or [] for k in keys)}
    affected = {s for s in closure if s in direct or graph.ancestors(s) & direct}
    return ([s for s in closure if s in affected], [s for s in closure if s not in affected])


def plan_sweep(root: Path, name: str, commit: str, set_args: list[str],
               params_file: str | None = None, targets: list[str] | None = None) -> SweepPlan:
    """The sweep's points and stages; InputError (exit 2) when there is nothing to sweep."""
    grid = expand_grid(set_args)
    sets = combine(read_param_sets(params_file) if params_file else [], grid)
    sets = [s for s in sets if s]
    if not sets:
        raise InputError("nothing to sweep: give -S KEY=VALUE[,VALUE...] or --params-file")
    width = len(str(len(sets)))
    points = [Point(f"{name}-{i:0{width}d}", s, override_error(root, commit, s))
              for i, s in enumerate(sets, start=1)]
    graph = read_stage_graph(root)
    closure = graph.resolve(targets)
    keys = swept_keys([p.overrides for p in points])
    affected, shared = split_stages(graph, read_dvc_yaml(root), keys, closure)
    if keys and not affected:
        raise InputError(f"no stage in dvc.yaml reads {', '.join(keys)}"
                         + (f" (among {', '.join(closure)})" if targets else "")
                         + ": every point would be the same experiment")
    return SweepPlan(name, commit, points, closure, affected, shared, targets, keys)

"""The shape of the code, checked: DVC deps that cannot miss a code change, one-way layers, no
cycles, modules and functions a reader can hold in mind, imports where a reader looks for them.

docs/ARCHITECTURE.md describes the layers these tests enforce.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from lmpipe.core.names import CHECK_STAGE, STAGES
from tests.conftest import REPO
from tests.helpers.imports import (
    import_closure,
    import_graph,
    imported_modules,
    module_name,
)

DVC_YAML = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def code_files(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (REPO / f).rglob("*.py"))


# ----------------------------------------------------------------------------- DVC deps
def uncovered_imports(stage: str, spec: dict) -> list[str]:
    """Files `python -m stages.<stage>` imports that no dep of the stage in `spec` covers."""
    deps = [d if isinstance(d, str) else next(iter(d)) for d in spec[stage].get("deps") or []]
    needed = import_closure(REPO, REPO / "stages" / f"{stage}.py") | {REPO / "stages" / "__init__.py"}
    missing = []
    for path in sorted(needed):
        rel = path.relative_to(REPO).as_posix()
        if not any(rel == d.rstrip("/") or rel.startswith(d.rstrip("/") + "/") for d in deps):
            missing.append(rel)
    return missing


@pytest.mark.parametrize("stage", [CHECK_STAGE, *STAGES])
def test_stage_deps_cover_every_file_the_stage_imports(stage):
    """Editing any file a stage imports must make `dvc status` report the stage."""
    missing = uncovered_imports(stage, DVC_YAML)
    assert not missing, (f"dvc.yaml: stage {stage} imports {missing} but does not list them "
                         "(or a folder holding them) in its deps")


def test_the_deps_check_catches_a_missing_dep():
    """The check above is not vacuous: drop one code dep and it reports exactly that file."""
    spec = {"pretrain": dict(DVC_YAML["pretrain"])}
    spec["pretrain"]["deps"] = [d for d in spec["pretrain"]["deps"]
                                if d != "lmpipe/models/transformer.py"]
    assert uncovered_imports("pretrain", spec) == ["lmpipe/models/transformer.py"]


def test_code_folders_used_as_deps_ignore_bytecode_caches():
    """A folder dep is hashed whole: __pycache__ must not make a stage look changed."""
    ignored = (REPO / ".dvcignore").read_text().split()
    assert "__pycache__/" in ignored and "*.pyc" in ignored


# ----------------------------------------------------------------------------- layers
# names, paths, params, files -> data and models -> training and evaluation -> stages and
# pipeline -> the command line. A module may import its own layer or a lower one.
LAYERS = [
    ("lmpipe.core", 1), ("lmpipe.models.configs", 1),
    ("lmpipe.data", 2), ("lmpipe.tokenizer", 2), ("lmpipe.ngram", 2), ("lmpipe.models", 2),
    ("lmpipe.train", 3), ("lmpipe.evaluation", 3), ("lmpipe.finetune", 3),
    ("lmpipe.tracking", 3),
    ("stages", 4), ("pipeline", 4),
    ("lmpipe.cli", 5),
    ("lmpipe", 0),
]


def layer(module: str) -> int:
    for prefix, n in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return n
    raise AssertionError(f"{module}: no layer assigned (add it to LAYERS and ARCHITECTURE.md)")


def test_layers_point_one_way():
    upward = []
    for path in code_files("lmpipe", "stages", "pipeline"):
        here = module_name(REPO, path)
        targets = imported_modules(REPO, path)
        # packages passed through on the way to a module (`lmpipe.models` of
        # `lmpipe.models.configs`) are not what the module depends on
        targets = {t for t in targets if not any(u.startswith(t + ".") for u in targets)}
        for target in targets:
            if target.split(".")[0] in ("lmpipe", "stages", "pipeline") and target != here \
                    and layer(target) > layer(here):
                upward.append(f"{here} (layer {layer(here)}) imports {target} "
                              f"(layer {layer(target)})")
    assert not upward, "\n".join(upward)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt == node or nxt not in graph:
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles():
    graph = import_graph(REPO, "lmpipe")
    # a package's __init__ is imported on the way to its modules: not a dependency of theirs
    graph = {m: {t for t in targets if not m.startswith(t + ".")} for m, targets in graph.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_check_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


# ----------------------------------------------------------------------------- sizes
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
# One concept each, kept whole on purpose (docs/ARCHITECTURE.md says why).
LONG_MODULES = {
    "lmpipe/core/params.py": "the whole params.yaml schema in one place",
    "lmpipe/ngram/model.py": "the n-gram model: storage, stream windows and scoring",
    "lmpipe/ngram/estimate.py": "Kneser-Ney and add-k estimation over shared counting",
    "lmpipe/ngram/arpa.py": "the ARPA format, writer and reader",
    "lmpipe/train/trainer.py": "the training loop and its checkpoint/resume state",
    "lmpipe/tokenizer/model.py": "the tokenizer wrapper and its exact round trip",
    "lmpipe/tracking/lineage.py": "lineage from dvc.lock, and its verification",
    "pipeline/flow.py": "the Prefect flow over the DVC stages",
}


def test_modules_stay_readable():
    too_long = []
    for path in code_files("lmpipe", "stages", "pipeline"):
        rel = path.relative_to(REPO).as_posix()
        n = len(path.read_text().splitlines())
        if n > MAX_MODULE_LINES and rel not in LONG_MODULES:
            too_long.append(f"{rel}: {n} lines")
    assert not too_long, "\n".join(too_long)


def test_functions_stay_readable():
    too_long = []
    for path in code_files("lmpipe", "stages", "pipeline"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {n} lines")
    assert not too_long, "\n".join(too_long)


# ----------------------------------------------------------------------------- imports
# Modules that may be imported inside a function, to keep `lmpipe --help` and the stages that
# do not need them fast; the function says so in a comment with the word "deferred".
DEFERRABLE = ("mlflow", "torch", "datasets", "prefect", "prefect_dask", "prefect_ray")


def test_imports_are_at_module_level_unless_deferred_for_speed():
    hidden = []
    for path in code_files("lmpipe", "stages", "pipeline"):
        source = path.read_text()
        lines = source.splitlines()
        rel = path.relative_to(REPO).as_posix()
        for fn in ast.walk(ast.parse(source)):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            body = "\n".join(lines[fn.lineno - 1:fn.end_lineno])
            for node in ast.walk(fn):
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                mod = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                top = (mod or "").split(".")[0]
                ours = top in ("lmpipe", "pipeline", "stages")
                allowed = (ours and rel.startswith("lmpipe/cli/")) or top in DEFERRABLE
                if not allowed or "deferred" not in body.lower():
                    hidden.append(f"{rel}:{node.lineno}: import of {mod} inside {fn.name}()")
    assert not hidden, "\n".join(hidden)


def test_shared_facts_are_defined_once():
    """Model-to-stage names, the ignore index and the dvc.lock reader live in one module each."""
    offenders = []
    for path in code_files("lmpipe", "stages", "pipeline"):
        rel = path.relative_to(REPO).as_posix()
        source = path.read_text()
        if rel != "lmpipe/core/names.py" and (re.search(r"(?m)^\s*\w+\s*=\s*-100\b", source)
                                              or '"transformer": "pretrain"' in source):
            offenders.append(f"{rel}: defines a name of lmpipe/core/names.py again")
        if rel != "lmpipe/core/records.py" and '"dvc.lock").read_text' in source:
            offenders.append(f"{rel}: reads dvc.lock itself (use lmpipe.core.records)")
    assert not offenders, "\n".join(offenders)

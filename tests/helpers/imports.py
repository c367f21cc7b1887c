"""The repository's own import graph, read from the source (ast), never by importing it.

Every `import` and `from ... import` statement counts, at module level or inside a function:
a deferred import still runs when its function does, so it is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path


def module_file(root: Path, module: str) -> Path | None:
    """The file of `module` inside `root` (a package's __init__.py), None when it is not ours."""
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(root: Path, path: Path) -> set[str]:
    """Modules of `root` that the file at `path` imports (each package on the way included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = module_name(root, path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if module_file(root, prefix) is not None:
                    found.add(prefix)
    return found


def import_closure(root: Path, start: Path) -> set[Path]:
    """Every file of `root` that running `start` can execute through imports (and `start`)."""
    todo, seen = [start], {start}
    while todo:
        path = todo.pop()
        for mod in imported_modules(root, path):
            f = module_file(root, mod)
            if f is not None and f not in seen:
                seen.add(f)
                todo.append(f)
    return seen


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """module -> the modules of `package` it imports, for every module of `package`."""
    graph = {}
    for path in sorted((root / package).rglob("*.py")):
        graph[module_name(root, path)] = {m for m in imported_modules(root, path)
                                          if m == package or m.startswith(package + ".")}
    return graph

"""The stage graph, read from DVC itself (`dvc dag --dot`), never assumed.

A stage exists when dvc.yaml declares it: the flow runs whatever subset is there. DVC decides
the edges (an out of one stage that is a dep of another), so templated paths, `foreach`
stages and `.dvc` imports are handled the way `dvc repro` handles them.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from lmpipe.core.dvc_cli import dvc_bin, dvc_env
from lmpipe.core.errors import InputError
from lmpipe.core.names import STAGES
from lmpipe.core.records import read_dvc_yaml

_NODE = re.compile(r'^\s*"([^"]+)";\s*$')
_EDGE = re.compile(r'^\s*"([^"]+)"\s*->\s*"([^"]+)";\s*$')


def _stage_order_key(name: str) -> tuple[int, str]:
    base = name.split("@", 1)[0]
    return (STAGES.index(base) if base in STAGES else len(STAGES), name)


@dataclass
class StageGraph:
    """Stages of dvc.yaml and, for each, the stages it reads from (its direct upstream)."""

    upstream: dict[str, set[str]] = field(default_factory=dict)

    @property
    def stages(self) -> list[str]:
        return self.topological(self.upstream)

    def topological(self, names) -> list[str]:
        """`names` in an order where every stage comes after its upstream (ties: STAGES order)."""
        names = set(names)
        done: list[str] = []
        placed: set[str] = set()
        while len(done) < len(names):
            ready = sorted(
                (n for n in names - placed if not (self.upstream.get(n, set()) & names) - placed),
                key=_stage_order_key,
            )
            if not ready:  # pragma: no cover - DVC refuses cyclic graphs itself
                raise InputError(f"dvc.yaml: stages form a cycle: {sorted(names - placed)}")
            done.append(ready[0])
            placed.add(ready[0])
        return done

    def resolve(self, wanted: list[str] | None) -> list[str]:
        """The requested stages plus everything upstream of them, in run order."""
        if not wanted:
            return self.stages
        chosen: set[str] = set()
        unknown = []
        for name in wanted:
            matches = [s for s in self.upstream if s == name or s.startswith(f"{name}@")]
            if not matches:
                unknown.append(name)
            chosen.update(matches)
        if unknown:
            have = ", ".join(self.stages) or "none"
            raise InputError(
                f"unknown stage(s) {', '.join(map(repr, unknown))}: dvc.yaml has {have}"
            )
        todo = list(chosen)
        while todo:
            for up in self.upstream.get(todo.pop(), set()):
                if up not in chosen:
                    chosen.add(up)
                    todo.append(up)
        return self.topological(chosen)

    def ancestors(self, name: str) -> set[str]:
        seen: set[str] = set()
        todo = [name]
        while todo:
            for up in self.upstream.get(todo.pop(), set()):
                if up not in seen:
                    seen.add(up)
                    todo.append(up)
        return seen

    def levels(self, names: list[str]) -> list[list[str]]:
        """Group `names` into waves: each wave depends only on earlier waves."""
        names_set = set(names)
        level: dict[str, int] = {}
        for n in self.topological(names_set):
            ups = self.upstream.get(n, set()) & names_set
            level[n] = 1 + max((level[u] for u in ups), default=-1)
        waves: list[list[str]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
        for n in self.topological(names_set):
            waves[level[n]].append(n)
        return waves


def parse_dot(text: str, stage_names: set[str] | None = None) -> StageGraph:
    """Parse `dvc dag --dot` output. Nodes that are not stages (`x.dvc` files) are dropped."""
    graph = StageGraph()
    edges = []
    for line in text.splitlines():
        if m := _EDGE.match(line):
            edges.append((m.group(1), m.group(2)))
        elif m := _NODE.match(line):
            graph.upstream.setdefault(m.group(1), set())
    for src, dst in edges:
        graph.upstream.setdefault(src, set())
        graph.upstream.setdefault(dst, set()).add(src)
    keep = {n for n in graph.upstream if not n.endswith(".dvc")}
    if stage_names is not None:
        keep &= stage_names | {n for n in keep if n.split("@", 1)[0] in stage_names}
    return StageGraph({n: ups & keep for n, ups in graph.upstream.items() if n in keep})


def read_stage_graph(root: str | os.PathLike) -> StageGraph:
    """The stage graph of the DVC project at `root` (empty when there is no dvc.yaml)."""
    root = Path(root)
    names = set(read_dvc_yaml(root))
    if not names:
        return StageGraph()
    proc = subprocess.run(
        [dvc_bin(), "dag", "--dot"], cwd=root, capture_output=True, text=True, env=dvc_env()
    )
    if proc.returncode != 0:
        raise InputError(f"dvc dag failed in {root}: {(proc.stderr or proc.stdout).strip()}")
    return parse_dot(proc.stdout, names)

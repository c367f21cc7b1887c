"""A stream of documents -> contiguous train/val/test splits of Parquet shards, in bounded memory.

The split rule: the corpus's lines, in order, are cut into three contiguous blocks at the
line boundaries nearest the byte fractions (train: the first `train` share of the bytes,
and so on; each split gets at least one line). No line is ever in two splits; a document
that straddles a cut becomes one row (a fragment) in each split, and joining a document's
fragments gives it back exactly.

The corpus is read once and never held whole:

1. `spool` writes the documents as they come into numbered shards of about `shard_bytes`
   (stopping at `max_bytes`, cut at a line boundary), counting each shard's bytes and
   lines; the total, which the fractions need, is known only at the end;
2. `publish_splits` finds each cut inside the one document that holds it (only that shard
   is read back, and only that document is cut into lines), then renames every shard that
   lies inside one split into that split's folder and rewrites only the shards a cut falls
   in, one piece per split.

Peak memory is one shard's documents (`shard_bytes` plus one document), whatever the
corpus size: shards are the unit of memory, of parallel encoding and of DVC hashing.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from lmpipe.core.errors import InputError
from lmpipe.core.names import CORPUS_SUFFIX, SPLITS, shard_file
from lmpipe.data.corpus import ShardInfo, ShardWriter, line_count, read_texts


@dataclass
class SplitStats:
    bytes: int
    lines: int
    documents: int


def lines_of(doc: str) -> list[str]:
    """The lines of `doc`, each keeping its '\\n'; ''.join(lines_of(d)) == d."""
    parts = doc.split("\n")
    out = [p + "\n" for p in parts[:-1]]
    if parts[-1]:
        out.append(parts[-1])
    return out


# ----------------------------------------------------------------------------- spooling
@dataclass
class Spooled:
    """The corpus as written by `spool`: its shards, and how much of the source was read."""

    shards: list[ShardInfo]
    documents_read: int = 0
    truncated: bool = False

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    @property
    def lines(self) -> int:
        return sum(s.lines for s in self.shards)


def _head(doc: str, budget: int, at_least_one: bool) -> str:
    """The first lines of `doc` that fit in `budget` UTF-8 bytes (at least one if asked)."""
    out, used = [], 0
    for line in lines_of(doc):
        size = len(line.encode("utf-8"))
        if used + size > budget and (out or not at_least_one):
            break
        out.append(line)
        used += size
    return "".join(out)


def spool(docs: Iterable[str], folder: Path, shard_bytes: int, max_bytes: int | None = None,
          progress: Callable[[int], None] | None = None) -> Spooled:
    """Write `docs` into shards under `folder`; with `max_bytes`, keep only the first
    `max_bytes` UTF-8 bytes, cut at a line boundary (at least one line), and read no further."""
    writer = ShardWriter(folder, shard_bytes)
    total = read = 0
    truncated = False
    for doc in docs:
        read += 1
        size = len(doc.encode("utf-8"))
        if max_bytes is not None and total + size > max_bytes:
            head = _head(doc, max_bytes - total, at_least_one=total == 0)
            if head:
                writer.add(head)
            truncated = True
            break
        writer.add(doc, size, line_count(doc))
        total += size
        if progress is not None:
            progress(size)
    return Spooled(writer.close(), read, truncated)


# ----------------------------------------------------------------------------- cutting
class _ShardDocs:
    """One shard's documents with their global byte and line offsets."""

    def __init__(self, shard: ShardInfo, bytes_before: int, lines_before: int):
        self.docs = read_texts(shard.path)
        n = len(self.docs)
        sizes = np.fromiter((len(d.encode("utf-8")) for d in self.docs), np.int64, n)
        lines = np.fromiter((line_count(d) for d in self.docs), np.int64, n)
        self.byte_end = bytes_before + np.cumsum(sizes)
        self.line_end = lines_before + np.cumsum(lines)
        self.byte_start, self.line_start = self.byte_end - sizes, self.line_end - lines

    def boundaries_near(self, target: float) -> tuple[int, np.ndarray]:
        """(global line index of the first, byte offsets of) the line boundaries of the
        document whose span holds `target`: both boundaries around it are among them."""
        d = min(int(np.searchsorted(self.byte_end, target, side="left")), len(self.docs) - 1)
        sizes = [len(line.encode("utf-8")) for line in lines_of(self.docs[d])]
        return int(self.line_start[d]), self.byte_start[d] + np.concatenate([[0], np.cumsum(sizes)])

    def rows(self, lo: int, hi: int) -> list[str]:
        """Global lines [lo, hi) of this shard, one row per document (or fragment)."""
        first = int(np.searchsorted(self.line_end, lo, side="right"))
        last = int(np.searchsorted(self.line_start, hi, side="left"))
        out = []
        for d in range(first, last):
            a, b = max(lo, self.line_start[d]), min(hi, self.line_end[d])
            whole = a == self.line_start[d] and b == self.line_end[d]
            out.append(self.docs[d] if whole else
                       "".join(lines_of(self.docs[d])[a - self.line_start[d]:b - self.line_start[d]]))
        return out


class _Layout:
    """Byte and line offsets of the spooled shards."""

    def __init__(self, shards: list[ShardInfo]):
        self.shards = shards
        self.bytes_before = np.cumsum([0] + [s.bytes for s in shards])
        self.lines_before = np.cumsum([0] + [s.lines for s in shards])

    def docs(self, i: int) -> _ShardDocs:
        return _ShardDocs(self.shards[i], int(self.bytes_before[i]), int(self.lines_before[i]))

    def nearest_cut(self, target: float, lo: int, hi: int) -> int:
        """The line count k in [lo, hi] whose byte boundary (bytes in the first k lines) is
        nearest to `target`; the nearer bound when no boundary near it is in range."""
        s = min(int(np.searchsorted(self.bytes_before[1:], target, side="left")), len(self.shards) - 1)
        first, boundary = self.docs(s).boundaries_near(target)
        k = first + int(np.searchsorted(boundary, target))  # the first boundary >= target
        candidates = [c for c in (k - 1, k) if lo <= c <= hi and 0 <= c - first < boundary.size]
        if not candidates:
            return lo if k < lo else hi
        return min(candidates, key=lambda c: abs(boundary[c - first] - target))


def publish_splits(spooled: Spooled, out: Path, fractions: tuple[float, float, float]
                   ) -> dict[str, SplitStats]:
    """`out`/<split>/part-NNNNN.parquet for train, val and test; returns each split's size."""
    n = spooled.lines
    if n < 3:
        raise InputError(f"the corpus has {n} line(s); splitting into train/val/test needs at least 3")
    layout = _Layout(spooled.shards)
    total, (train, val, _) = spooled.bytes, fractions
    k1 = layout.nearest_cut(total * train, 1, n - 2)
    k2 = layout.nearest_cut(total * (train + val), k1 + 1, n - 1)
    ranges = {"train": (0, k1), "val": (k1, k2), "test": (k2, n)}
    stats = {s: SplitStats(0, 0, 0) for s in SPLITS}
    count = {s: 0 for s in SPLITS}
    for i, shard in enumerate(spooled.shards):
        a, b = int(layout.lines_before[i]), int(layout.lines_before[i + 1])
        pieces = [(s, max(a, lo), min(b, hi)) for s, (lo, hi) in ranges.items()
                  if max(a, lo) < min(b, hi)]
        if len(pieces) == 1:  # wholly inside one split: moved, not rewritten
            s = pieces[0][0]
            target = out / s / shard_file(count[s], CORPUS_SUFFIX)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(shard.path, target)
            _add(stats[s], SplitStats(shard.bytes, shard.lines, shard.documents))
            count[s] += 1
            continue
        docs = layout.docs(i)
        for s, lo, hi in pieces:
            rows = docs.rows(lo, hi)
            writer = ShardWriter(out / s, shard_bytes=1 << 62, first_index=count[s])
            for row in rows:
                writer.add(row)
            (info,) = writer.close()
            _add(stats[s], SplitStats(info.bytes, info.lines, info.documents))
            count[s] += 1
        shard.path.unlink()
    return stats


def _add(acc: SplitStats, more: SplitStats) -> None:
    acc.bytes += more.bytes
    acc.lines += more.lines
    acc.documents += more.documents


def discard(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)

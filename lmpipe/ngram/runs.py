"""Sorted runs on disk and their merge: the storage under lmpipe/ngram/external.py.

A run is one chunk's distinct n-gram keys in increasing order, with their counts and suffix
ids. Runs are appended to three column files and merged a block per run at a time: every key
up to the smallest last key among the blocks in memory is final (no later block of any run
can hold a smaller one), so the merge needs memory for the blocks only, however many runs
there are. Files are read and written with plain I/O, never memory-mapped: mapped pages
would count as the process's resident memory.
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


class Disk:
    """The spill folder: named arrays appended to and read back in pieces."""

    def __init__(self, folder: Path):
        self.folder = folder

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.bin"

    def append(self, name: str, arr: np.ndarray) -> None:
        with open(self.path(name), "ab") as f:
            np.ascontiguousarray(arr).tofile(f)

    def read(self, name: str, dtype, start: int = 0, count: int = -1) -> np.ndarray:
        dtype = np.dtype(dtype)
        path = self.path(name)
        if not path.exists():
            return np.empty(0, dtype=dtype)
        with open(path, "rb") as f:
            return np.fromfile(f, dtype=dtype, count=count, offset=start * dtype.itemsize)

    def size(self, name: str, dtype) -> int:
        path = self.path(name)
        return path.stat().st_size // np.dtype(dtype).itemsize if path.exists() else 0

    def remove(self, *names: str) -> None:
        for name in names:
            self.path(name).unlink(missing_ok=True)

    def join(self, name: str, parts: list[str]) -> None:
        """Concatenate the files `parts`, in order, into `name` (the parts are removed)."""
        self.remove(name)
        if not parts:
            return
        first = self.path(parts[0])
        if first.exists():
            first.rename(self.path(name))
        else:
            self.path(name).touch()
        with open(self.path(name), "ab") as out:
            for part in parts[1:]:
                path = self.path(part)
                if path.exists():
                    with open(path, "rb") as f:
                        shutil.copyfileobj(f, out, 16 << 20)
                    path.unlink()

    def mapped(self, name: str, dtype) -> np.ndarray:
        """The finished array, memory-mapped; its file is unlinked (the mapping keeps it)."""
        path = self.path(name)
        if path.stat().st_size == 0:
            return np.zeros(0, dtype=dtype)
        arr = np.memmap(path, dtype=dtype, mode="r")
        path.unlink()
        return arr


def read_tokens(x, a: int, b: int) -> np.ndarray:
    """Tokens [a, b) as int64, through plain file reads when `x` is memory-mapped."""
    shards = getattr(x, "shards", None)
    if shards is not None:  # lmpipe/data/tokens.py's ShardedTokens
        parts, starts = [], x.starts
        for k, shard in enumerate(shards):
            lo, hi = max(a, int(starts[k])), min(b, int(starts[k + 1]))
            if lo < hi:
                parts.append(read_tokens(shard, lo - int(starts[k]), hi - int(starts[k])))
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    if isinstance(x, np.memmap) and getattr(x, "filename", None):
        with open(x.filename, "rb") as f:
            out = np.fromfile(f, dtype=x.dtype, count=b - a, offset=x.offset + a * x.dtype.itemsize)
        return out.astype(np.int64)
    return np.asarray(x[a:b], dtype=np.int64)


_ARANGE: dict[int, np.ndarray] = {}


def _arange(n: int) -> np.ndarray:
    if n not in _ARANGE:  # the same few chunk sizes over and over
        if len(_ARANGE) > 8:
            _ARANGE.clear()
        _ARANGE[n] = np.arange(n, dtype=np.int64)
    return _ARANGE[n]


def sorted_with_order(keys: np.ndarray, key_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(keys sorted, the order that sorts them), through one np.sort of packed pairs (a
    vectorised sort: np.argsort is several times slower)."""
    n = keys.shape[0]
    index_bits = max(1, (n - 1).bit_length())
    if key_bits + index_bits > 63:
        order = np.argsort(keys, kind="stable")
        return keys[order], order
    packed = keys.view(np.int64) << index_bits
    packed |= _arange(n)
    packed.sort()
    order = packed & ((1 << index_bits) - 1)
    packed >>= index_bits
    return packed.view(np.uint64), order


def dedup(sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index of the first of each run of equal keys, group number of every key)."""
    new = np.empty(sorted_keys.shape[0], dtype=bool)
    if new.size:
        new[0] = True
        np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=new[1:])
    group = np.cumsum(new, dtype=np.int32 if new.size < 2**31 else np.int64)
    group -= 1
    return np.flatnonzero(new), group


class Runs:
    """The sorted runs of one order on disk (three column files per run), merged a block per
    run at a time, in `threads` key ranges at once."""

    def __init__(self, disk: Disk, n: int, count_dtype, suffix_dtype):
        self.disk, self.n = disk, n
        self.count_dtype, self.suffix_dtype = np.dtype(count_dtype), np.dtype(suffix_dtype)
        self.lengths: dict[int, int] = {}
        self.rank_dtype = np.dtype(np.int64)
        self.part_bases: list[int] = []    # first global id of each key range

    def add(self, r: int, keys: np.ndarray, counts: np.ndarray, suffix: np.ndarray) -> None:
        """Run number `r` (runs may be added in any order, from several threads)."""
        self.disk.append(f"rk{self.n}_{r}", keys)
        self.disk.append(f"rc{self.n}_{r}", counts.astype(self.count_dtype))
        self.disk.append(f"rs{self.n}_{r}", suffix.astype(self.suffix_dtype))
        self.lengths[r] = keys.shape[0]

    def _lower_bound(self, r: int, key: int) -> int:
        """The first entry of run r whose key is >= `key` (a binary search on disk)."""
        lo, hi = 0, self.lengths[r]
        while lo < hi:
            mid = (lo + hi) // 2
            if int(self.disk.read(f"rk{self.n}_{r}", np.uint64, mid, 1)[0]) < key:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def _ranges(self, parts: int) -> list[dict[int, tuple[int, int]]]:
        """`parts` key ranges of about equal size (pivots from keys sampled in every run),
        as each run's [start, stop) entries."""
        runs = sorted(self.lengths)
        if parts <= 1:
            return [{r: (0, self.lengths[r]) for r in runs}]
        sample = np.sort(np.concatenate([
            self.disk.read(f"rk{self.n}_{r}", np.uint64, int(i), 1)
            for r in runs for i in np.linspace(0, self.lengths[r] - 1, 32) if self.lengths[r]]))
        pivots = [int(sample[len(sample) * p // parts]) for p in range(1, parts)] if sample.size else []
        cuts = {r: [0] + [self._lower_bound(r, k) for k in pivots] + [self.lengths[r]] for r in runs}
        return [{r: (cuts[r][p], cuts[r][p + 1]) for r in runs} for p in range(len(pivots) + 1)]

    def merge(self, key_bits: int, memory_entries: int, ranks: bool = True, threads: int = 1) -> int:
        """Merge into K{n}, C{n}, S{n} (keys, counts, suffix ids) and, with `ranks`, each run
        entry's global id (`ranks(r)`); returns the number of distinct n-grams. Key ranges
        merge in parallel, each into its own files; the column files are then joined."""
        n, disk = self.n, self.disk
        self.rank_dtype = np.dtype(np.int32 if sum(self.lengths.values()) < 2**31 else np.int64)
        ranges = self._ranges(max(1, threads))
        per_part = max(1 << 10, memory_entries // len(ranges))
        with ThreadPoolExecutor(len(ranges)) as pool:
            sizes = list(pool.map(lambda p: self._merge_range(p, ranges[p], key_bits, per_part, ranks),
                                  range(len(ranges))))
        self.part_bases = [0] + list(np.cumsum(sizes)[:-1].tolist())
        for name in ("K", "C", "S"):
            disk.join(f"{name}{n}", [f"{name}{n}.{p}" for p in range(len(ranges))])
        return int(sum(sizes))

    def _merge_range(self, part: int, spans: dict[int, tuple[int, int]], key_bits: int,
                     memory_entries: int, ranks: bool) -> int:
        disk, n = self.disk, self.n
        runs = [r for r in sorted(spans) if spans[r][1] > spans[r][0]]
        block = max(256, memory_entries // (len(runs) + 1))
        pos = {r: spans[r][0] for r in runs}
        bufs: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        base = 0
        while True:
            live = []
            for r in runs:
                if (r not in bufs or bufs[r][0].size == 0) and pos[r] < spans[r][1]:
                    take = min(block, spans[r][1] - pos[r])
                    bufs[r] = (disk.read(f"rk{n}_{r}", np.uint64, pos[r], take),
                               disk.read(f"rc{n}_{r}", self.count_dtype, pos[r], take),
                               disk.read(f"rs{n}_{r}", self.suffix_dtype, pos[r], take))
                    pos[r] += take
                if r in bufs and bufs[r][0].size:
                    live.append(r)
            if not live:
                return base
            bound = min(bufs[r][0][-1] for r in live)
            taken = []
            for r in live:
                keys, counts, suffix = bufs[r]
                cut = int(np.searchsorted(keys, bound, side="right"))
                taken.append((r, keys[:cut], counts[:cut], suffix[:cut]))
                bufs[r] = (keys[cut:], counts[cut:], suffix[cut:])
            base = self._merge_block(part, taken, key_bits, base, ranks)

    def _merge_block(self, part: int, taken, key_bits: int, base: int, ranks: bool) -> int:
        keys = np.concatenate([t[1] for t in taken])
        counts = np.concatenate([t[2] for t in taken])
        suffix = np.concatenate([t[3] for t in taken])
        sk, order = sorted_with_order(keys, key_bits)
        del keys
        first, group = dedup(sk)
        n, disk = self.n, self.disk
        disk.append(f"K{n}.{part}", sk[first])
        disk.append(f"C{n}.{part}", np.add.reduceat(counts[order], first).astype(self.count_dtype)
                    if first.size else counts[:0])
        disk.append(f"S{n}.{part}", suffix[order[first]])
        if ranks:
            local = np.empty(order.shape[0], dtype=self.rank_dtype)
            local[order] = group
            local += base
            at = 0
            for r, k, _, _ in taken:
                disk.append(f"rank{n}_{r}.{part}", local[at:at + k.shape[0]])
                at += k.shape[0]
        return base + int(first.shape[0])

    def ranks(self, r: int) -> np.ndarray:
        """The global id of every entry of run r, in the run's order."""
        parts = [self.disk.read(f"rank{self.n}_{r}.{p}", self.rank_dtype) + base
                 for p, base in enumerate(self.part_bases)]
        return np.concatenate(parts) if parts else np.empty(0, dtype=self.rank_dtype)

    def rank_at(self, r: int, i: int) -> int:
        """The global id of entry i of run r."""
        for p in reversed(range(len(self.part_bases))):
            size = self.disk.size(f"rank{self.n}_{r}.{p}", self.rank_dtype)
            before = sum(self.disk.size(f"rank{self.n}_{r}.{q}", self.rank_dtype) for q in range(p))
            if i >= before and size:
                return int(self.disk.read(f"rank{self.n}_{r}.{p}", self.rank_dtype, i - before, 1)[0]
                           + self.part_bases[p])
        raise IndexError(f"run {r} has no entry {i}")

    def discard_runs(self) -> None:
        for r in self.lengths:
            self.disk.remove(f"rk{self.n}_{r}", f"rc{self.n}_{r}", f"rs{self.n}_{r}")

    def discard_ranks(self) -> None:
        for r in self.lengths:
            for p in range(len(self.part_bases)):
                self.disk.remove(f"rank{self.n}_{r}.{p}")


class SparseWriter:
    """A dense float32 array written in id order from sparse increasing (ids, values)."""

    def __init__(self, disk: Disk, name: str, size: int):
        self.disk, self.name, self.size, self.next = disk, name, size, 0

    def put(self, ids: np.ndarray, values: np.ndarray) -> None:
        if ids.size == 0:
            return
        out = np.zeros(int(ids[-1]) + 1 - self.next, dtype=np.float32)
        out[ids - self.next] = values
        self.disk.append(self.name, out)
        self.next = int(ids[-1]) + 1

    def close(self) -> None:
        if self.next < self.size:
            self.disk.append(self.name, np.zeros(self.size - self.next, dtype=np.float32))
        self.next = self.size


def remove_stale_spills(work_dir: Path) -> None:
    """Spill folders of runs that were killed (their process is gone): they can be large."""
    for folder in work_dir.glob("ngram-spill-*"):
        try:
            pid = int(folder.name.split("-")[2])
        except (IndexError, ValueError):
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:
            pass

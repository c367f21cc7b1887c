"""Estimating an n-gram model on disk in bounded memory: sorted runs, merged per order.

lmpipe/ngram/estimate.py keeps every distinct n-gram of two orders in hash tables (about
80 bytes each at the peak). Beyond `ngram.memory_gb` this module takes over, the way KenLM's
lmplz does under its -S budget: counts are spilled to disk as sorted runs and merged, and
the probabilities are computed a block at a time from the merged files. The chunk, merge and
block sizes follow the budget; only arrays of one entry per distinct n-gram of the orders
being estimated (the lower order's probabilities and the continuation counts, 8 + 4 bytes)
are held whole, and counted in it. Nothing proportional to the corpus is. With `threads`,
chunks are counted and key ranges merged in parallel (numpy releases the GIL in its sorts).

Ids. An n-gram's key is (id of its prefix, the n-gram without its last word) << bits |
last word, as in the hash tables, and its id is the key's rank among the order's distinct
keys. Ranks of lexicographically sorted prefixes give lexicographically sorted keys, so a
level is simply its sorted keys (Level.sorted, looked up by binary search); an n-gram
starting with <s> (symbol V, the largest) sorts last, so those form each order's tail.

Counting order n, one chunk of the stream at a time. At token t the n-gram ending there has
key id_{n-1}(t - 1) << bits | x_t and extends, to the left, the (n-1)-gram ending at t: its
suffix id is id_{n-1}(t). A chunk's keys are sorted and deduplicated into a run (keys,
counts, suffix ids) written to disk, with each position's index into the run. The runs are
merged a block at a time (a key is final once it is at most the smallest last key of the
blocks in memory); the merge writes the order's sorted keys, counts and suffix ids, and the
global id of every run entry, from which id_n(t) follows for every position when order
n + 1 is counted.

Probabilities. Kneser-Ney for order n needs order n + 1's suffix ids (its continuation
counts) and order n - 1's probabilities; contexts are contiguous in a sorted order, so each
block of n-grams (cut at a context boundary) carries its contexts' sums and back-off
weights. The arithmetic is the in-memory estimator's, operation for operation: the two
agree to float rounding (tested to 1e-6 in log10). Add-k works the same way.

The runs and their merge (and the spill folder) are lmpipe/ngram/runs.py. The finished levels are memory-mapped
and their files unlinked, so the disk space is returned when the model is dropped.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from lmpipe.core.console import Progress
from lmpipe.core.errors import InputError
from lmpipe.ngram.estimate import check_arguments, discounts_from, log10_clipped, warn_fallback
from lmpipe.ngram.model import NO_PROB, Level, NgramModel, as_stream, word_bits
from lmpipe.ngram.runs import (
    Disk,
    Runs,
    SparseWriter,
    dedup,
    read_tokens,
    remove_stale_spills,
    sorted_with_order,
)

MAX_CHUNK = 1 << 22          # positions per run: an index into it packs in 22 bits
BYTES_PER_POSITION = 96      # counting memory per position of a chunk (keys, sort, inverse)
BYTES_PER_MERGED = 110       # merge memory per run entry read (columns, copies, sort, ranks)
BYTES_PER_ESTIMATED = 200    # probability memory per n-gram of a block (columns, float64 temps)
IN_MEMORY_BYTES_PER_NGRAM = 90   # the in-memory estimator's peak (benchmarks/ngram.py: 70-90)


# ----------------------------------------------------------------------------- counting


def in_memory_fits(n_tokens: int, vocab_size: int, order: int, memory_bytes: int) -> bool:
    """Whether the in-memory estimator surely fits in `memory_bytes`: its peak is about
    IN_MEMORY_BYTES_PER_NGRAM per distinct n-gram, and order n has at most min(tokens,
    (V + 1)^n) of them (counts are unknown before counting, so the bound is taken)."""
    distinct = sum(min(n_tokens, (vocab_size + 1) ** n) for n in range(1, order + 1))
    return distinct * IN_MEMORY_BYTES_PER_NGRAM + 16 * n_tokens <= memory_bytes


class _Counter:
    """Counting every order of the stream into sorted files, chunk by chunk."""

    def __init__(self, x, vocab: int, eos: int, order: int, memory_bytes: int, disk: Disk,
                 threads: int = 1):
        self.x, self.V, self.eos, self.order, self.disk = x, vocab, eos, order, disk
        self.N = int(x.shape[0])
        self.bits = word_bits(vocab)
        self.threads = max(1, threads)
        chunk = int(min(MAX_CHUNK, max(1 << 10, memory_bytes // BYTES_PER_POSITION // self.threads)))
        self.bounds = [(a, min(a + chunk, self.N)) for a in range(0, self.N, chunk)]
        self.merge_entries = max(1 << 10, memory_bytes // BYTES_PER_MERGED)
        self.count_dtype = np.int32 if self.N < 2**31 else np.int64
        self.sizes = {1: vocab + 1}            # ids per order (order 1: the symbols, <s> = V)
        self.runs: dict[int, Runs] = {}       # the merged runs whose ids are still needed
        self.raw1 = np.zeros(vocab + 1, dtype=np.int64)
        self.timings = {"count_seconds": 0.0, "merge_seconds": 0.0}

    def id_dtype(self, n: int):
        return np.int32 if self.sizes[n] < 2**31 else np.int64

    def ids(self, n: int, r: int, xs: np.ndarray) -> np.ndarray:
        """id_n(t) for every t of chunk r (tokens `xs`): the n-gram ending at t, -1 where none
        fits."""
        if n == 1:
            return xs
        inv = self.disk.read(f"inv{n}_{r}", np.int32)
        ranks = self.runs[n].ranks(r)
        out = np.full(inv.shape[0], -1, dtype=np.int64)
        ok = inv >= 0
        out[ok] = ranks[inv[ok]]
        return out

    def id_at(self, n: int, r: int, t: int) -> int:
        """id_n(t) for one position t of chunk r (two small reads)."""
        if n == 1:
            return int(read_tokens(self.x, t, t + 1)[0])
        i = int(self.disk.read(f"inv{n}_{r}", np.int32, t - self.bounds[r][0], 1)[0])
        return -1 if i < 0 else self.runs[n].rank_at(r, i)

    def count(self, n: int, threads: int = 1) -> int:
        """Count order n (needs id_{n-1}); returns its number of distinct n-grams. Chunks are
        independent (each reads the one position before it), so `threads` count at once:
        numpy releases the GIL in the sorts and array arithmetic that make up the work."""
        runs = Runs(self.disk, n, self.count_dtype, self.id_dtype(n - 1))
        key_bits = self.sizes[n - 1].bit_length() + self.bits
        t0 = time.perf_counter()
        with Progress(f"ngram: count order {n}", total=self.N, unit="tok") as bar, \
                ThreadPoolExecutor(max(1, threads)) as pool:
            futures = [pool.submit(self._count_chunk, n, r, runs, key_bits)
                       for r in range(len(self.bounds))]
            for future in as_completed(futures):
                raw1, size = future.result()
                if raw1 is not None:
                    self.raw1 += raw1
                bar.update(size)
        t1 = time.perf_counter()
        self.sizes[n] = runs.merge(key_bits, self.merge_entries, ranks=n < self.order,
                                   threads=threads)
        self.timings["count_seconds"] += t1 - t0
        self.timings["merge_seconds"] += time.perf_counter() - t1
        runs.discard_runs()
        self.runs[n] = runs
        if n - 1 in self.runs:  # id_{n-1} is no longer needed
            self.runs.pop(n - 1).discard_ranks()
            for r in range(len(self.bounds)):
                self.disk.remove(f"inv{n - 1}_{r}")
        return self.sizes[n]

    def _count_chunk(self, n: int, r: int, runs: Runs, key_bits: int):
        """One chunk of order n: its run, and each position's index into it (inv{n}_{r})."""
        V, (a, b) = self.V, self.bounds[r]
        xs = read_tokens(self.x, a, b)
        raw1 = None
        if n == 2:
            self._check_ids(xs)
            raw1 = np.bincount(xs, minlength=V + 1)
        cur = self.ids(n - 1, r, xs)
        start = np.empty(b - a, dtype=bool)  # t starts a document
        start[0] = a == 0 or int(read_tokens(self.x, a - 1, a)[0]) == self.eos
        np.equal(xs[:-1], self.eos, out=start[1:])
        prev = np.empty(b - a, dtype=np.int64)
        prev[0] = -1 if a == 0 else self.id_at(n - 1, r - 1, a - 1)
        prev[1:] = cur[:-1]
        if n == 2:
            np.copyto(prev, V, where=start)
            keys, valid = prev, None
        else:
            valid = np.flatnonzero((prev >= 0) & ~start)
            keys = prev[valid]
        keys <<= self.bits
        keys |= xs if valid is None else xs[valid]
        sk, order = sorted_with_order(keys.view(np.uint64), key_bits)
        del keys
        first, group = dedup(sk)
        suffix = cur if valid is None else cur[valid]
        runs.add(r, sk[first], np.diff(np.append(first, sk.shape[0])), suffix[order[first]])
        if n < self.order:  # the next order needs every position's id at this one
            inv = np.full(b - a, -1, dtype=np.int32)
            inv[order if valid is None else valid[order]] = group
            self.disk.append(f"inv{n}_{r}", inv)
        return raw1, b - a

    def _check_ids(self, xs: np.ndarray) -> None:
        if xs.size and (int(xs.min()) < 0 or int(xs.max()) >= self.V):
            bad = xs[(xs < 0) | (xs >= self.V)][0]
            raise InputError(f"token id {int(bad)} is outside the vocabulary [0, {self.V})")


# ----------------------------------------------------------------------------- probabilities
class _Estimator:
    """Kneser-Ney or add-k, one order at a time, over the sorted files of _Counter."""

    def __init__(self, counter: _Counter, method: str, k: float, memory_bytes: int):
        self.c, self.method, self.k = counter, method, k
        self.memory_bytes = memory_bytes
        self.block = max(4 * (counter.V + 1), memory_bytes // BYTES_PER_ESTIMATED)
        self.discounts: list[list[float]] = []
        self.fallback: list[bool] = []
        self.sb_start = {1: counter.V}   # the first id (of each order) that starts with <s>
        self.logp1: np.ndarray | None = None
        self.bo1: np.ndarray | None = None   # order 1's back-off weights (orders >= 2: B{n})

    def _lower_bound(self, n: int, prefix: int) -> int:
        """The first id of order n whose prefix id is >= `prefix` (binary search on disk)."""
        lo, hi = 0, self.c.sizes[n]
        while lo < hi:
            mid = (lo + hi) // 2
            if int(self.c.disk.read(f"K{n}", np.uint64, mid, 1)[0]) >> self.c.bits < prefix:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def _continuations(self, n: int) -> np.ndarray:
        """Distinct left extensions of every n-gram: how often it is the suffix of an
        (n + 1)-gram."""
        size = self.c.sizes[n]
        cont = np.zeros(size, dtype=np.int32)
        dtype = self.c.id_dtype(n)
        for a in range(0, self.c.sizes[n + 1], max(self.block, size)):
            cont += np.bincount(self.c.disk.read(f"S{n + 1}", dtype, a, max(self.block, size)),
                                minlength=size).astype(np.int32)
        return cont

    def _blocks(self, n: int):
        """(start, keys, raw counts, suffix ids) in blocks that end at a context boundary."""
        disk, size, a = self.c.disk, self.c.sizes[n], 0
        while a < size:
            keys = disk.read(f"K{n}", np.uint64, a, self.block)
            if a + keys.shape[0] < size:  # keep the last context whole for the next block
                pre = keys >> np.uint64(self.c.bits)
                keys = keys[:int(np.searchsorted(pre, pre[-1], side="left"))]
            m = keys.shape[0]
            yield (a, keys, disk.read(f"C{n}", self.c.count_dtype, a, m),
                   disk.read(f"S{n}", self.c.id_dtype(n - 1), a, m))
            a += m

    def _adjusted(self, n: int, a: int, raw: np.ndarray, cont: np.ndarray | None) -> np.ndarray:
        if cont is None:  # the highest order keeps raw counts
            return raw
        keep = min(max(self.sb_start[n] - a, 0), raw.shape[0])  # n-grams starting with <s>
        return np.concatenate([cont[a:a + keep], raw[keep:]])

    def order1(self, top: bool) -> None:
        """Order 1 (dense, as in the in-memory estimator); p(w), with p(<s>) = 0, to P1."""
        V, raw = self.c.V, self.c.raw1
        if self.method == "add_k":
            c1 = raw[:V].astype(np.float64)
            self.logp1 = np.append(log10_clipped((c1 + self.k) / (c1.sum() + self.k * V)),
                                   np.float32(NO_PROB)).astype(np.float32)
            return
        a = raw[:V] if top else self._continuations(1)[:V].astype(np.int64)
        ds, fb = discounts_from([int(np.count_nonzero(a == j)) for j in (1, 2, 3, 4)])
        self.discounts.append(list(ds))
        self.fallback.append(fb)
        dof = np.array([0.0, ds[0], ds[1], ds[2]])[np.minimum(a, 3)]
        af = a.astype(np.float64)
        total = af.sum()
        p1 = (af - dof) / total + (dof.sum() / total) / V if total > 0 else np.full(V, 1.0 / V)
        prob = np.append(p1, 0.0)
        self.logp1 = log10_clipped(prob)
        self.logp1[V] = NO_PROB
        if not top:
            self.c.disk.append("P1", prob)

    def order_n(self, n: int, p_prev: np.ndarray, top: bool) -> None:
        """Order n >= 2: appends log10 p to L{n}, p to P{n} (Kneser-Ney, below the highest
        order: the next order interpolates with it) and the back-off weights of order n - 1
        to B{n - 1}, all in id order."""
        c = self.c
        self.sb_start[n] = self._lower_bound(n, self.sb_start[n - 1])
        cont = None if top or self.method == "add_k" else self._continuations(n)
        dense = p_prev.nbytes + (0 if cont is None else cont.nbytes)  # what blocks must leave
        self.block = max(4 * (c.V + 1), (self.memory_bytes - dense) // BYTES_PER_ESTIMATED)
        ds = (0.0, 0.0, 0.0)
        if self.method == "kneser_ney":
            t = [0, 0, 0, 0]
            for a, _, raw, _ in self._blocks(n):
                adj = self._adjusted(n, a, raw, cont)
                t = [t[j - 1] + int(np.count_nonzero(adj == j)) for j in (1, 2, 3, 4)]
            ds, fb = discounts_from(t)
            self.discounts.append(list(ds))
            self.fallback.append(fb)
        bo = SparseWriter(c.disk, f"B{n - 1}", c.sizes[n - 1]) if n > 2 else None
        bo1 = np.zeros(c.V + 1, dtype=np.float32)
        for a, keys, raw, suffix in self._blocks(n):
            pre = (keys >> np.uint64(c.bits)).astype(np.int64)
            new = np.diff(pre, prepend=-1) != 0
            first, ctx_of = np.flatnonzero(new), np.cumsum(new) - 1
            logp, p, ctx_bo = self._probabilities(self._adjusted(n, a, raw, cont), first, ctx_of,
                                                  suffix, p_prev, ds)
            if bo is None:
                bo1[pre[first]] = ctx_bo
            else:
                bo.put(pre[first], ctx_bo)
            c.disk.append(f"L{n}", logp)
            if p is not None and not top:
                c.disk.append(f"P{n}", p)
        if bo is None:
            self.bo1 = bo1
        else:
            bo.close()

    def _probabilities(self, adj, first, ctx_of, suffix, p_prev, ds):
        """(log10 p, p, back-off weight of each context) of one block (in-memory formulas)."""
        if self.method == "add_k":
            c = adj.astype(np.float64)
            ctx_total = np.add.reduceat(c, first) if first.size else c[:0]
            kV = self.k * self.c.V
            return (log10_clipped((c + self.k) / (ctx_total[ctx_of] + kV)), None,
                    log10_clipped(self.k / (ctx_total + kV)))
        dof = np.array([0.0, ds[0], ds[1], ds[2]])[np.minimum(adj, 3)]
        af = adj.astype(np.float64)
        ctx_total = np.add.reduceat(af, first) if first.size else af[:0]
        ctx_disc = np.add.reduceat(dof, first) if first.size else af[:0]
        with np.errstate(divide="ignore", invalid="ignore"):
            inv_total, gamma = np.divide(1.0, ctx_total), np.divide(ctx_disc, ctx_total)
        is_ctx = ctx_total > 0
        af -= dof
        af *= inv_total[ctx_of]
        p = gamma[ctx_of] * p_prev[suffix]
        p += af
        bo = np.where(is_ctx, log10_clipped(np.where(is_ctx, gamma, 1.0)), np.float32(0))
        return log10_clipped(p), p, bo


def estimate_on_disk(tokens, vocab_size: int, eos_id: int, order: int = 4,
                     method: str = "kneser_ney", k: float = 0.01, unk_id: int | None = None,
                     bos_id: int | None = None, memory_bytes: int = 4 << 30,
                     work_dir: str | Path | None = None, threads: int = 1) -> NgramModel:
    """Estimate a model as lmpipe.ngram.estimate.estimate does, in about `memory_bytes` plus,
    while order n is estimated, 8 bytes per distinct (n-1)-gram and 4 per n-gram (the lower
    order's probabilities and the continuation counts), spilling to a temporary folder under
    `work_dir`. The model's levels are sorted and memory-mapped."""
    check_arguments(vocab_size, eos_id, order, method, k, 1 << 20)
    t_start = time.perf_counter()
    x = as_stream(tokens)
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
        remove_stale_spills(Path(work_dir))
    folder = Path(tempfile.mkdtemp(prefix=f"ngram-spill-{os.getpid()}-", dir=work_dir))
    try:
        disk = Disk(folder)
        counter = _Counter(x, vocab_size, eos_id, order, memory_bytes, disk, threads)
        est = _Estimator(counter, method, k, memory_bytes)
        if order == 1:
            for a, b in counter.bounds:
                xs = read_tokens(x, a, b)
                counter._check_ids(xs)
                counter.raw1 += np.bincount(xs, minlength=vocab_size + 1)
        for n in range(1, order + 1):
            if n < order:  # order n's continuation counts come from order n + 1
                counter.count(n + 1, threads)
            t0 = time.perf_counter()
            if n == 1:
                est.order1(top=n == order)
            else:
                est.order_n(n, disk.read(f"P{n - 1}", np.float64), top=n == order)
                disk.remove(f"C{n}", f"S{n}")
            disk.remove(f"P{n - 1}")
            counter.timings["probability_seconds"] = (counter.timings.get("probability_seconds", 0.0)
                                                      + time.perf_counter() - t0)
        levels = _levels(counter, est, order)
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # mapped levels live on until dropped
    n_distinct = [int(np.count_nonzero(counter.raw1[:vocab_size]))]
    n_distinct += [counter.sizes[n] for n in range(2, order + 1)]
    if method == "kneser_ney":
        warn_fallback(est.fallback)
    extra = ({"discounts": est.discounts, "discount_fallback": est.fallback}
             if method == "kneser_ney" else {"k": k})
    meta = {"train_tokens": counter.N, "ngrams_per_order": n_distinct, **extra}
    model = NgramModel(levels, vocab_size, eos_id, unk_id=unk_id, bos_id=bos_id, method=method,
                       meta=meta)
    model.timings = {"estimate_seconds": time.perf_counter() - t_start, **counter.timings}
    return model


def _levels(counter: _Counter, est: _Estimator, order: int) -> list[Level]:
    disk = counter.disk
    levels = [Level(None, est.logp1, None if order == 1 else est.bo1)]
    for n in range(2, order + 1):
        bo = None if n == order else disk.mapped(f"B{n}", np.float32)
        levels.append(Level(disk.mapped(f"K{n}", np.uint64), disk.mapped(f"L{n}", np.float32),
                            bo, sorted=True))
    return levels

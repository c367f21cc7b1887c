"""Estimating an n-gram model from a token stream: interpolated modified Kneser-Ney, add-k.

The formulas are in lmpipe/ngram/model.py's docstring. Orders are counted one after the
other, each in one open-addressing hash table (lmpipe/ngram/hashtable.py) over chunks of the
stream; the probabilities of order n are computed as soon as order n + 1 is counted, so only
two orders of counts are alive at once.
"""

from __future__ import annotations

import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from lmpipe.core.errors import InputError
from lmpipe.ngram import hashtable as nh
from lmpipe.ngram.model import (
    DEFAULT_CHUNK_TOKENS,
    FALLBACK_DISCOUNTS,
    LN10,
    MAX_ORDER,
    METHODS,
    NO_PROB,
    Level,
    NgramModel,
    Window,
    as_stream,
    chunk_bounds,
    pack,
    stream_window,
    word_bits,
)


def _discounts(adjusted: np.ndarray) -> tuple[tuple[float, float, float], bool]:
    """Chen & Goodman's D1, D2, D3+ from count-of-counts; (fallback, True) when undefined."""
    return discounts_from([int(np.count_nonzero(adjusted == k)) for k in (1, 2, 3, 4)])


def discounts_from(t: list[int]) -> tuple[tuple[float, float, float], bool]:
    """The discounts from t = (number of n-grams of adjusted count 1, 2, 3, 4)."""
    if min(t) > 0:
        y = t[0] / (t[0] + 2 * t[1])
        ds = (1 - 2 * y * t[1] / t[0], 2 - 3 * y * t[2] / t[1], 3 - 4 * y * t[3] / t[2])
        if all(0 < dk < k for k, dk in zip((1, 2, 3), ds)):
            return ds, False
    return FALLBACK_DISCOUNTS, True


def _move(arr: np.ndarray, remap: np.ndarray, size: int, fill) -> np.ndarray:
    out = np.full(size, fill, dtype=arr.dtype)
    sel = np.flatnonzero(remap >= 0)
    out[remap[sel]] = arr[sel]
    return out


def log10_clipped(p: np.ndarray) -> np.ndarray:
    """float32 log10, clipped at 0 (a rounding error must not give a positive log)."""
    with np.errstate(divide="ignore"):
        out = np.log(p)
    out *= 1.0 / LN10
    np.minimum(out, 0.0, out=out)
    return out.astype(np.float32)


def _slot_dtype(size: int) -> type:
    return np.int32 if size < 2**31 else np.int64


class _Counts:
    """Raw counts of one order >= 2 while the stream is read: a growing hash table.

    raw[slot]: occurrences; suffix[slot]: slot (one order down) of the n-gram without its
    first word, i.e. the n-gram it extends to the left (the link continuation counts need).
    """

    def __init__(self, need: int, count_dtype: type):
        self.table = nh.empty_table(nh.table_size(int(need * 1.05) + 16))
        self.raw = np.zeros(self.table.shape[0], dtype=count_dtype)
        self.suffix = np.full(self.table.shape[0], -1, dtype=_slot_dtype(self.table.shape[0]))
        self.used = 0
        self.fresh = True

    def count_into(self, slots: np.ndarray) -> None:
        np.add(self.raw, np.bincount(slots, minlength=self.table.shape[0]), out=self.raw, casting="unsafe")

    def _resize(self, size: int) -> np.ndarray:
        self.table, remap = nh.rebuild(self.table, size)
        self.raw = _move(self.raw, remap, size, 0)
        self.suffix = _move(self.suffix, remap, size, -1)
        return remap

    def add(self, keys: np.ndarray, hashes: np.ndarray, need: int, done: float) -> np.ndarray:
        """Insert a chunk's keys (about `need` distinct); `done`: fraction of the stream read
        once this chunk is in, used to size a growing table for the whole stream at once."""
        if self.used + need > nh.MAX_LOAD * self.table.shape[0]:
            projected = int((self.used + need) / max(done, 1e-9))  # distinct n-grams grow sublinearly
            self._resize(max(nh.table_size(projected), nh.table_size(self.used + need)))
        while True:
            try:
                slots = nh.insert(self.table, keys, hashes, fresh=self.fresh)
                break
            except nh.TableFull:
                self.fresh = False
                self._resize(nh.table_size(int(np.count_nonzero(self.table != nh.EMPTY)) + need, 0.5))
        self.fresh = False
        self.used = int(np.count_nonzero(self.table != nh.EMPTY))
        return slots

    def compact(self) -> np.ndarray | None:
        """Shrink an under-filled table; returns the slot remap (None when unchanged)."""
        if self.used >= nh.MIN_LOAD * self.table.shape[0]:
            return None
        return self._resize(nh.table_size(self.used))


def estimate(tokens, vocab_size: int, eos_id: int, order: int = 4, method: str = "kneser_ney",
             k: float = 0.01, unk_id: int | None = None, bos_id: int | None = None,
             chunk_tokens: int = DEFAULT_CHUNK_TOKENS, threads: int = 1) -> NgramModel:
    """Estimate a model from a token-id stream (array or memmap; documents end with EOS).

    Orders are counted one after the other; within an order the stream is read in chunks of
    `chunk_tokens` (plus order - 1 tokens of context), so memory is the tables (O(distinct
    n-grams)) plus O(chunk). When the stream fits in one chunk, the slots of the previous
    order are kept per position instead of being looked up again.
    """
    check_arguments(vocab_size, eos_id, order, method, k, chunk_tokens)
    t_start = time.perf_counter()
    x = as_stream(tokens)
    V = vocab_size
    bits = word_bits(V)
    bounds = chunk_bounds(x.shape[0], chunk_tokens)
    count_dtype = np.int32 if x.shape[0] < 2**31 else np.int64  # an n-gram occurs < tokens times
    single = len(bounds) == 1
    only_window = stream_window(x, 0, bounds[0][1], order, eos_id, V) if single else None

    def windows() -> Iterator[tuple[int, Window]]:
        if only_window is not None:
            yield bounds[0][1], only_window
        else:
            for a, b in bounds:
                yield b, stream_window(x, a, b, order, eos_id, V)

    # order 1: raw counts (dense; slot = symbol)
    raw1 = np.zeros(V + 1, dtype=np.int64)
    for _, win in windows():
        raw1 += np.bincount(win.S[win.pred], minlength=V + 1)
    n_distinct = [int(np.count_nonzero(raw1[:V]))]
    builder = _KneserNey(V, order) if method == "kneser_ney" else _AddK(V, order, k)
    # threads > 1: the probabilities of order n - 1 are computed on a second thread while
    # order n + 1 is counted (numpy releases the GIL in its loops; they share only read-only
    # tables). Measured on a loaded 2-core machine it did not pay, hence off by default.
    pool = ThreadPoolExecutor(max_workers=1) if threads > 1 else None
    pushed = []

    def push(*args) -> None:
        if pool is None:
            builder.push(*args)
        else:
            pushed.append(pool.submit(builder.push, *args))

    push(1, None, raw1, None)
    tables: list[np.ndarray | None] = [None]
    # single chunk: positions where the previous order's n-gram ends, and its slot
    cache: tuple[np.ndarray, np.ndarray] | None = None
    if single:
        cache = (np.arange(only_window.S.shape[0], dtype=np.int64), only_window.S)

    for n in range(2, order + 1):
        prev_size = V + 1 if n == 2 else tables[-1].shape[0]
        if prev_size >= 1 << (63 - bits):
            raise InputError(f"order {n}: too many distinct n-grams for 64-bit keys")
        counts, cache = _count_order(n, windows(), cache, tables, bits, x.shape[0], count_dtype)
        tables.append(counts.table)
        n_distinct.append(counts.used)
        push(n, counts.table, counts.raw, counts.suffix)  # estimates order n - 1 (or n)
        del counts
    cache = only_window = None
    if pool is not None:
        try:
            for future in pushed:
                future.result()
        finally:
            pool.shutdown(wait=True)
    levels, extra = builder.finish()
    meta = {"train_tokens": int(x.shape[0]), "ngrams_per_order": n_distinct, **extra}
    model = NgramModel(levels, V, eos_id, unk_id=unk_id, bos_id=bos_id, method=method, meta=meta)
    model.timings = {"estimate_seconds": time.perf_counter() - t_start}
    return model


def check_arguments(vocab_size: int, eos_id: int, order: int, method: str, k: float,
                     chunk_tokens: int) -> None:
    if method not in METHODS:
        raise InputError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not 1 <= order <= MAX_ORDER:
        raise InputError(f"order must be between 1 and {MAX_ORDER}, got {order}")
    if vocab_size < 1 or not 0 <= eos_id < vocab_size:
        raise InputError(f"eos_id {eos_id} must lie in [0, vocab_size={vocab_size})")
    if method == "add_k" and not k > 0:
        raise InputError(f"add-k needs k > 0, got {k}")
    if chunk_tokens < 1:
        raise InputError(f"chunk_tokens must be positive, got {chunk_tokens}")


def _count_order(n: int, windows, cache, tables, bits: int, n_tokens: int, count_dtype):
    """Count the n-grams of every window into one table, with each n-gram's suffix link.

    `cache` (single-chunk streams only): the positions where the (n-1)-grams end and their
    slots, so they need not be looked up again; returns the same for order n, else None.
    """
    counts: _Counts | None = None
    next_cache = None
    for win_end, win in windows:
        S, d = win.S, win.d
        if cache is not None:
            pos, prev_all = cache
        else:  # slots of the (n-1)-grams of this window, from the finished tables
            pos, prev_all = np.arange(S.shape[0], dtype=np.int64), S
            for m in range(2, n):
                p, ctx = _advance(pos, prev_all, d, m)
                pos, prev_all = p, nh.lookup(tables[m - 1], pack(ctx, S[p], bits))
        p, prev = _advance(pos, prev_all, d, n)
        keys = pack(prev, S[p], bits)
        hashes = nh.mix(keys)
        need = nh.estimate_distinct(keys, hashes)
        if counts is None:
            counts = _Counts(need, count_dtype)
        slots = counts.add(keys, hashes, need, win_end / max(n_tokens, 1))
        del keys, hashes, prev
        first = win.first
        if p.size and p[0] < first:  # context-only tokens at the window's start
            c = p >= first
            cs, ends = slots[c], p[c]
        else:
            cs, ends = slots, p
        counts.count_into(cs)
        # the n-gram ending at p extends (to the left) the (n-1)-gram ending at p
        full = np.full(S.shape[0], -1, dtype=np.int64)
        full[pos] = prev_all
        counts.suffix[cs] = full[ends]
        del full, prev_all
        if cache is not None:
            next_cache = (p, slots)
    if counts is None:
        counts = _Counts(0, count_dtype)
    remap = counts.compact()
    if next_cache is not None and remap is not None:
        next_cache = (next_cache[0], remap[next_cache[1]])
    return counts, next_cache


def _advance(pos: np.ndarray, ids: np.ndarray, d: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """From (n-1)-grams ending at `pos` (slots `ids`) to the positions p = pos + 1 where an
    n-gram fits inside its document; returns (p, slot of its (n-1)-gram prefix)."""
    p = pos + 1
    if p.size and p[-1] == d.shape[0]:
        p, ids = p[:-1], ids[:-1]
    ok = d[p] >= n - 1
    if not ok.all():
        p, ids = p[ok], ids[ok]
    return p, ids


def _occupied(table: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(occupied slots, slot of each one's prefix) of one order's table."""
    occ = nh.occupied(table)
    return occ, table[occ].view(np.int64) >> bits


@dataclass
class _Counted:
    """One counted order: its table (None for order 1), raw counts and suffix links."""

    n: int
    table: np.ndarray | None
    raw: np.ndarray
    suffix: np.ndarray | None
    occ: np.ndarray
    pre: np.ndarray | None


class _KneserNey:
    """Interpolated modified Kneser-Ney, one order at a time.

    `push` receives each order as soon as it is counted; the probabilities of order n are
    computed when order n + 1 arrives (its suffix links give order n's continuation counts),
    after which order n's counts are dropped: only two orders of counts are alive at once.
    """

    def __init__(self, V: int, order: int):
        self.V, self.order, self.bits = V, order, word_bits(V)
        self.levels: list[Level] = []
        self.discounts: list[list[float]] = []
        self.fallback: list[bool] = []
        self.prob_prev: np.ndarray | None = None
        self.sb_prev = np.arange(V + 1) == V  # order-1 slots that start with <s>
        self.pending: _Counted | None = None

    def push(self, n: int, table, raw, suffix) -> None:
        if n == 1:
            cur = _Counted(1, None, raw, None, np.arange(self.V), None)
        else:
            occ, pre = _occupied(table, self.bits)
            cur = _Counted(n, table, raw, suffix, occ, pre)
        if self.pending is not None:
            self._estimate(self.pending, cur)
        self.pending = cur
        if n == self.order:
            self._estimate(cur, None)
            self.pending = None

    def _estimate(self, lv: _Counted, up: _Counted | None) -> None:
        V, n = self.V, lv.n
        size = V + 1 if n == 1 else lv.table.shape[0]
        occ, pre = lv.occ, lv.pre
        # adjusted counts: raw at the top order and for n-grams that start with <s> (nothing
        # can precede them), else the number of distinct words seen before the n-gram
        sb = self.sb_prev[occ] if n == 1 else self.sb_prev[pre]
        if up is not None and n > 1:
            sb_full = np.zeros(size, dtype=bool)
            sb_full[occ] = sb
            self.sb_prev = sb_full
        if up is None:
            a = lv.raw[occ]
        else:
            cont = np.bincount(up.suffix[up.occ], minlength=size)
            a = np.where(sb, lv.raw[occ], cont[occ])
            del cont
        del sb
        lv.raw = None
        ds, fb = _discounts(a[a > 0] if n == 1 else a)
        self.discounts.append(list(ds))
        self.fallback.append(fb)
        dof = np.array([0.0, ds[0], ds[1], ds[2]])[np.minimum(a, 3)]
        af = a.astype(np.float64)
        del a
        last = up is None
        if n == 1:
            total = af.sum()
            if total > 0:
                p1 = (af - dof) / total + (dof.sum() / total) / V
            else:
                p1 = np.full(V, 1.0 / V)
            self.prob_prev = np.append(p1, 0.0)
            logp1 = log10_clipped(self.prob_prev)
            logp1[V] = NO_PROB
            self.levels.append(Level(None, logp1, None if last else np.zeros(V + 1, np.float32)))
            return
        # per context h: 1 / sum_v a(hv) and gamma(h), side by side as one complex number
        # (a single random read per n-gram fetches both)
        prev_size = self.prob_prev.shape[0]
        ctx_total = np.bincount(pre, weights=af, minlength=prev_size)
        ctx_disc = np.bincount(pre, weights=dof, minlength=prev_size)
        ctx = np.empty(prev_size, dtype=np.complex128)
        with np.errstate(divide="ignore", invalid="ignore"):
            np.divide(1.0, ctx_total, out=ctx.real)
            np.divide(ctx_disc, ctx_total, out=ctx.imag)
        is_ctx = ctx_total > 0
        del ctx_total, ctx_disc
        g = ctx[pre]
        lv.pre = None
        af -= dof
        af *= g.real
        p = g.imag * self.prob_prev[lv.suffix[occ]]
        lv.suffix = None
        p += af
        del g, dof, af
        self.prob_prev = None
        self.levels[n - 2].bo = np.where(is_ctx, log10_clipped(np.where(is_ctx, ctx.imag, 1.0)), np.float32(0))
        del ctx, is_ctx
        logp = np.zeros(size, dtype=np.float32)
        logp[occ] = log10_clipped(p)
        if not last:
            self.prob_prev = np.zeros(size)
            self.prob_prev[occ] = p
        del p
        lv.occ = None
        self.levels.append(Level(lv.table, logp, None if last else np.zeros(size, np.float32)))

    def finish(self) -> tuple[list[Level], dict]:
        warn_fallback(self.fallback)
        return self.levels, {"discounts": self.discounts, "discount_fallback": self.fallback}


def warn_fallback(fallback: list[bool]) -> None:
    if any(fallback):
        orders = [str(i + 1) for i, fb in enumerate(fallback) if fb]
        warnings.warn(
            f"Kneser-Ney: count-of-counts too small to estimate discounts for order(s) "
            f"{', '.join(orders)}; using the fallback {FALLBACK_DISCOUNTS}",
            RuntimeWarning,
            stacklevel=4,
        )


class _AddK:
    """Add-k estimates, one order at a time (each order needs only its own counts)."""

    def __init__(self, V: int, order: int, k: float):
        self.V, self.order, self.k, self.bits = V, order, k, word_bits(V)
        self.levels: list[Level] = []

    def push(self, n: int, table, raw, suffix) -> None:
        V, k, last = self.V, self.k, n == self.order
        if n == 1:
            c1 = raw[:V].astype(np.float64)
            logp1 = np.append(log10_clipped((c1 + k) / (c1.sum() + k * V)), np.float32(NO_PROB))
            self.levels.append(Level(None, logp1.astype(np.float32), None if last else np.zeros(V + 1, np.float32)))
            return
        occ, pre = _occupied(table, self.bits)
        c = raw[occ].astype(np.float64)
        ctx_total = np.bincount(pre, weights=c, minlength=self.levels[-1].size)
        is_ctx = np.flatnonzero(ctx_total)
        self.levels[n - 2].bo[is_ctx] = log10_clipped(k / (ctx_total[is_ctx] + k * V))
        logp = np.zeros(table.shape[0], dtype=np.float32)
        logp[occ] = log10_clipped((c + k) / (ctx_total[pre] + k * V))
        self.levels.append(Level(table, logp, None if last else np.zeros(table.shape[0], np.float32)))

    def finish(self) -> tuple[list[Level], dict]:
        return self.levels, {"k": self.k}

"""Count-based n-gram language models on token-id streams.

Two estimators share one storage and one scorer:

* ``kneser_ney`` - interpolated modified Kneser-Ney (Chen & Goodman 1998): three discounts
  per order (D1, D2, D3+) from the count-of-counts of that order, continuation counts
  (number of distinct left extensions) for every order below the highest, except n-grams
  that start with ``<s>`` (nothing can precede them, so they keep their raw counts, as in
  KenLM), and interpolation down to the uniform distribution over the vocabulary::

      p(w | h) = max(a(hw) - D(a(hw)), 0) / sum_v a(hv) + gamma(h) * p(w | h')
      gamma(h) = (D1 N1(h.) + D2 N2(h.) + D3 N3+(h.)) / sum_v a(hv)
      p(w)     = max(a(w) - D(a(w)), 0) / sum_v a(v) + gamma() / V

  with p(w | h) = p(w | h') when h never occurs as a context. Every probability is
  positive and every distribution over the V token ids sums to one.
* ``add_k`` - the textbook additive (Lidstone) estimate (c(hw) + k) / (c(h.) + k V) on the
  longest context h (up to order - 1 tokens) that occurred as a context in training; the
  unigram estimate when none did. Each is a proper distribution, so it sums to one too.

Token stream convention (docs/ARCHITECTURE.md): every document ends with EOS; the context
before the first token of a stream and after every EOS is ``<s>``; EOS is ``</s>``. A stream
of N tokens is scored as N predictions.

Storage: the model is kept the way an ARPA file is (log10 probability of each seen n-gram
given its context, log10 back-off weight of each context; for add-k the second slot holds
the probability of an unseen word), one open-addressing hash table per order whose slot is
the n-gram's id (see lmpipe/ngram_hash.py). Estimation and scoring work on whole arrays per
order (pack, hash, insert/lookup, bincount), never with a Python loop per token or n-gram,
and process the stream in chunks. The probabilities of order n are computed as soon as order
n + 1 is counted, so only two orders of counts are alive at once: memory is O(distinct
n-grams + chunk) - about 25 bytes per n-gram for the model and 70-90 bytes per n-gram at the
estimation peak (benchmarks/ngram.py measures it).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from lmpipe import ngram_hash as nh
from lmpipe.errors import InputError

METHODS = ("kneser_ney", "add_k")
FORMAT = "lmpipe-ngram"
FORMAT_VERSION = 1
MODEL_FILE = "model.npz"
ARPA_FILE = "model.arpa.gz"
LN10 = math.log(10.0)
NO_PROB = -99.0  # log10 "probability" of <s> (never predicted), the ARPA convention
FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)  # KenLM's --discount_fallback values
DEFAULT_CHUNK_TOKENS = 1 << 23
MAX_ORDER = 10


@dataclass
class Level:
    """One order of the model.

    keys: uint64 hash table (None for order 1, which is dense: slot = symbol, V = <s>).
    logp: float32 log10 p(w | context) of the n-gram in each slot.
    bo:   float32 per slot, used when the n-gram is a context of the next order: log10
          back-off weight (Kneser-Ney/ARPA) or log10 probability of an unseen word (add-k);
          0 when the n-gram is not a context. None at the highest order.
    """

    keys: np.ndarray | None
    logp: np.ndarray
    bo: np.ndarray | None

    @property
    def size(self) -> int:
        return self.logp.shape[0]

    def occupied(self) -> np.ndarray:
        if self.keys is None:
            return np.arange(self.logp.shape[0])
        return nh.occupied(self.keys)


# --------------------------------------------------------------------------- the stream
@dataclass
class _Window:
    """A slice of the token stream with <s> inserted at document starts.

    S: symbols (token ids, and V for <s>). d: distance to the last <s> (a window that starts
    inside a document counts its index 0 as the boundary, which is exact for every n-gram
    the window can hold). pred: S indices of the window's own tokens (the ones it counts or
    scores); the up to order - 1 tokens before them are context only.
    """

    S: np.ndarray
    d: np.ndarray
    pred: np.ndarray

    @property
    def first(self) -> int:
        return int(self.pred[0]) if self.pred.size else self.S.shape[0]


def _window(x: np.ndarray, a: int, b: int, order: int, eos: int, vocab: int) -> _Window:
    w0 = max(0, a - (order - 1))
    t = np.asarray(x[w0:b])
    n = t.shape[0]
    if n and (int(t.min()) < 0 or int(t.max()) >= vocab):
        bad = t[(t < 0) | (t >= vocab)][0]
        raise InputError(f"token id {int(bad)} is outside the vocabulary [0, {vocab})")
    starts = np.zeros(n, dtype=bool)
    if n:
        starts[0] = w0 == 0 or int(x[w0 - 1]) == eos
        np.equal(t[:-1], eos, out=starts[1:])
    nstarts = np.cumsum(starts)
    tok_pos = np.arange(n) + nstarts
    length = n + (int(nstarts[-1]) if n else 0)
    small = np.int32 if length < 2**31 else np.int64  # half the memory traffic
    S = np.full(length, vocab, dtype=np.int32)
    S[tok_pos] = t
    del t
    last = np.zeros(length, dtype=small)
    bos = tok_pos[starts] - 1
    last[bos] = bos
    np.maximum.accumulate(last, out=last)
    d = np.arange(length, dtype=small)
    d -= last
    return _Window(S=S, d=d, pred=tok_pos[a - w0 :])


def _chunks(n_tokens: int, chunk_tokens: int) -> list[tuple[int, int]]:
    if n_tokens == 0:
        return [(0, 0)]
    return [(a, min(a + chunk_tokens, n_tokens)) for a in range(0, n_tokens, chunk_tokens)]


def _as_stream(ids) -> np.ndarray:
    arr = ids if isinstance(ids, np.ndarray) else np.asarray(ids, dtype=np.int64)
    if arr.ndim != 1:
        raise InputError(f"a token stream must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"token ids must be integers, got {arr.dtype}")
    return arr


def word_bits(vocab_size: int) -> int:
    """Bits of the last-word field of a key: symbols 0..V (V is <s>) must fit."""
    return int(vocab_size).bit_length()


def pack(prefix: np.ndarray, words: np.ndarray, bits: int) -> np.ndarray:
    """Key of n-grams = (slot of the (n-1)-gram prefix << bits) | last word, as uint64."""
    return ((prefix.astype(np.int64, copy=False) << bits) | words).view(np.uint64)


def unpack(keys: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(prefix slot, last word) of packed keys, as int64."""
    k = keys.view(np.int64)
    return k >> bits, k & ((1 << bits) - 1)


def _next_ids(level: Level, prev: np.ndarray, words: np.ndarray, vocab: int) -> np.ndarray:
    """Ids at `level` of (prefix id `prev`, last word `words`); -1 where absent or prev < 0."""
    out = np.full(prev.shape[0], -1, dtype=np.int64)
    ok = np.flatnonzero(prev >= 0)
    if ok.size and level.keys is not None:
        out[ok] = nh.lookup(level.keys, pack(prev[ok], words[ok], word_bits(vocab)))
    return out


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez without timestamps: the same model gives a byte-identical file (DVC)."""
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)


# --------------------------------------------------------------------------- the model
class NgramModel:
    """An n-gram model over token ids 0..V-1 (see the module docstring)."""

    def __init__(
        self,
        levels: list[Level],
        vocab_size: int,
        eos_id: int,
        unk_id: int | None = None,
        bos_id: int | None = None,
        method: str = "kneser_ney",
        meta: dict | None = None,
    ):
        if not levels:
            raise ValueError("a model needs at least one order")
        self.levels = levels
        self.vocab_size = int(vocab_size)
        self.eos_id = int(eos_id)
        self.unk_id = None if unk_id is None else int(unk_id)
        self.bos_id = None if bos_id is None else int(bos_id)
        self.method = method
        self.meta = dict(meta or {})  # saved with the model (deterministic: no timings)
        self.timings: dict[str, float] = {}

    # -- description
    @property
    def order(self) -> int:
        return len(self.levels)

    @property
    def backoff(self) -> bool:
        """True for back-off semantics (Kneser-Ney, any ARPA model); False for add-k."""
        return self.method != "add_k"

    def ngram_counts(self) -> list[int]:
        """Entries per order as stored (order 1: the V token ids, without <s>)."""
        return [self.vocab_size] + [int(lv.occupied().shape[0]) for lv in self.levels[1:]]

    def nbytes(self) -> int:
        total = 0
        for lv in self.levels:
            for arr in (lv.keys, lv.logp, lv.bo):
                if arr is not None:
                    total += arr.nbytes
        return total

    def __repr__(self) -> str:
        return (
            f"NgramModel(order={self.order}, method={self.method!r}, vocab_size={self.vocab_size}, "
            f"ngrams={self.ngram_counts()})"
        )

    # -- persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write the compact binary form (uncompressed .npz: loads at disk speed).

        `path` is a folder (the file is `model.npz` inside it) or a file path ending in .npz.
        """
        from lmpipe.io import atomic_path

        path = Path(path)
        target = path if path.suffix == ".npz" else path / MODEL_FILE
        info = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "order": self.order,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "unk_id": self.unk_id,
            "bos_id": self.bos_id,
            "method": self.method,
            "meta": self.meta,
        }
        arrays: dict[str, np.ndarray] = {
            "info": np.frombuffer(json.dumps(info, sort_keys=True).encode(), dtype=np.uint8)
        }
        for n, lv in enumerate(self.levels, start=1):
            arrays[f"logp_{n}"] = lv.logp
            if lv.keys is not None:
                arrays[f"keys_{n}"] = lv.keys
            if lv.bo is not None:
                arrays[f"bo_{n}"] = lv.bo
        with atomic_path(target) as tmp:
            _write_npz(tmp, arrays)
        return target

    @classmethod
    def load(cls, path: str | os.PathLike) -> "NgramModel":
        """Load a model saved by `save` (a folder holding model.npz, or the file itself).

        A folder with only an ARPA file (model.arpa.gz, e.g. built by KenLM over token ids)
        is read with `read_arpa`.
        """
        path = Path(path)
        target = path / MODEL_FILE if path.is_dir() else path
        if path.is_dir() and not target.exists() and (path / ARPA_FILE).exists():
            return read_arpa(path / ARPA_FILE)
        if not target.exists():
            raise InputError(f"{target}: n-gram model not found (run `dvc repro ngram`)")
        try:
            with np.load(target, allow_pickle=False) as z:
                info = json.loads(bytes(z["info"]).decode())
                if info.get("format") != FORMAT:
                    raise InputError(f"{target}: not an lmpipe n-gram model")
                if info.get("version", 0) > FORMAT_VERSION:
                    raise InputError(f"{target}: model format {info['version']} is newer than this code")
                order = int(info["order"])
                levels = []
                for n in range(1, order + 1):
                    levels.append(
                        Level(
                            keys=z[f"keys_{n}"] if f"keys_{n}" in z else None,
                            logp=z[f"logp_{n}"],
                            bo=z[f"bo_{n}"] if f"bo_{n}" in z else None,
                        )
                    )
        except (OSError, ValueError, KeyError) as err:
            raise InputError(f"{target}: cannot read n-gram model ({err})") from None
        return cls(
            levels,
            vocab_size=info["vocab_size"],
            eos_id=info["eos_id"],
            unk_id=info.get("unk_id"),
            bos_id=info.get("bos_id"),
            method=info["method"],
            meta=info.get("meta") or {},
        )

    # -- scoring
    def log10probs(self, ids, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, threads: int = 1) -> np.ndarray:
        """log10 p of every token of a stream (float64), under the scoring convention.

        The stream is scored in windows of at most `chunk_tokens` (each with order - 1
        tokens of context before it); a long stream is split over `threads` threads.
        """
        x = _as_stream(ids)
        n = x.shape[0]
        out = np.empty(n, dtype=np.float64)
        if threads > 1 and n >= (1 << 20):
            chunk_tokens = min(chunk_tokens, -(-n // threads))
        bounds = [(a, b) for a, b in _chunks(n, chunk_tokens) if b > a]

        def work(ab: tuple[int, int]) -> None:
            a, b = ab
            out[a:b] = self._score_window(_window(x, a, b, self.order, self.eos_id, self.vocab_size))

        if threads > 1 and len(bounds) > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=threads) as pool:
                list(pool.map(work, bounds))
        else:
            for ab in bounds:
                work(ab)
        return out

    def logprobs(self, ids, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, threads: int = 1) -> np.ndarray:
        """Natural-log probability of every token of a stream (float64).

        The context before the first token is <s>; EOS is </s> and the context after it
        restarts at <s>. N tokens give N log-probabilities.
        """
        return self.log10probs(ids, chunk_tokens, threads) * LN10

    def score(self, ids, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, threads: int = 1) -> tuple[float, int]:
        """(total negative log-likelihood in nats, number of tokens) of a stream."""
        lp = self.logprobs(ids, chunk_tokens, threads)
        return float(-lp.sum()), int(lp.shape[0])

    def _score_window(self, win: _Window) -> np.ndarray:
        S, d = win.S, win.d
        bits = word_bits(self.vocab_size)
        res = self.levels[0].logp[S].astype(np.float64)
        # positions whose (n-1)-gram (ending there) is in the model, and its slot
        pos = np.arange(S.shape[0] - 1, dtype=np.int64)
        ids = S[:-1]
        for n in range(2, self.order + 1):
            lower, level = self.levels[n - 2], self.levels[n - 1]
            nxt = pos + 1  # predict nxt with the context ending at pos
            ok = d[nxt] >= n - 1
            if not ok.all():
                nxt, ids = nxt[ok], ids[ok]
            if nxt.size == 0:
                break
            ctx = ids
            ids = nh.lookup(level.keys, pack(ctx, S[nxt], bits))
            found = ids >= 0
            lp = level.logp[np.where(found, ids, 0)]
            if self.backoff:
                res[nxt] = np.where(found, lp, res[nxt] + lower.bo[ctx])
            else:
                unseen = lower.bo[ctx]
                res[nxt] = np.where(found, lp, np.where(unseen != 0, unseen, res[nxt]))
            if n < self.order:
                keep = np.flatnonzero(found)
                pos, ids = nxt[keep], ids[keep]
                if pos.size and pos[-1] == S.shape[0] - 1:
                    pos, ids = pos[:-1], ids[:-1]
        return res[win.pred]

    # -- single contexts
    def _context(self, context_ids: Sequence[int]) -> list[int]:
        """The symbols the model conditions on: <s> + tokens since the last EOS, cut to order-1."""
        ctx = [int(t) for t in np.asarray(context_ids, dtype=np.int64).reshape(-1)]
        for t in ctx:
            if not 0 <= t < self.vocab_size:
                raise InputError(f"token id {t} is outside the vocabulary [0, {self.vocab_size})")
        if self.eos_id in ctx:
            ctx = ctx[len(ctx) - ctx[::-1].index(self.eos_id) :]
        ctx = [self.vocab_size] + ctx
        keep = self.order - 1
        return ctx[max(0, len(ctx) - keep) :] if keep > 0 else []

    def _ngram_id(self, words: Sequence[int]) -> int:
        """Slot of an n-gram (a list of symbols) at order len(words), or -1."""
        if not words or len(words) > self.order:
            return -1
        cur = np.array([words[0]], dtype=np.int64)
        for n in range(2, len(words) + 1):
            cur = _next_ids(self.levels[n - 1], cur, np.array([words[n - 1]]), self.vocab_size)
            if cur[0] < 0:
                return -1
        return int(cur[0])

    def next_log10_distribution(self, context_ids: Sequence[int]) -> np.ndarray:
        V = self.vocab_size
        ctx = self._context(context_ids)
        res = self.levels[0].logp[:V].astype(np.float64)
        words = np.arange(V, dtype=np.int64)
        for c in range(1, len(ctx) + 1):
            hid = self._ngram_id(ctx[len(ctx) - c :])
            if hid < 0:
                break
            lower, level = self.levels[c - 1], self.levels[c]
            ids = _next_ids(level, np.full(V, hid, dtype=np.int64), words, V)
            found = ids >= 0
            lp = level.logp[np.where(found, ids, 0)]
            if self.backoff:
                res = np.where(found, lp, res + float(lower.bo[hid]))
            elif lower.bo[hid] != 0:
                res = np.where(found, lp, float(lower.bo[hid]))
        return res

    def next_distribution(self, context_ids: Sequence[int]) -> np.ndarray:
        """p(w | context) for every token id w (float64, sums to 1).

        `context_ids` are the tokens since the start of the stream (or any suffix that
        reaches back to a document start); the context is <s> followed by the tokens after
        the last EOS, as in `logprobs`, so `logprobs(ctx + [w])[-1] == log(p[w])`.
        """
        return np.power(10.0, self.next_log10_distribution(context_ids))


# --------------------------------------------------------------------------- estimation
def _discounts(adjusted: np.ndarray) -> tuple[tuple[float, float, float], bool]:
    """Chen & Goodman's D1, D2, D3+ from count-of-counts; (fallback, True) when undefined."""
    t = [int(np.count_nonzero(adjusted == k)) for k in (1, 2, 3, 4)]
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


def _log10(p: np.ndarray) -> np.ndarray:
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


def estimate(
    tokens,
    vocab_size: int,
    eos_id: int,
    order: int = 4,
    method: str = "kneser_ney",
    k: float = 0.01,
    unk_id: int | None = None,
    bos_id: int | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    threads: int = 1,
) -> NgramModel:
    """Estimate a model from a token-id stream (array or memmap; documents end with EOS).

    Orders are counted one after the other; within an order the stream is read in chunks of
    `chunk_tokens` (plus order - 1 tokens of context), so memory is the tables (O(distinct
    n-grams)) plus O(chunk). When the stream fits in one chunk, the slots of the previous
    order are kept per position instead of being looked up again.
    """
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
    import time

    t_start = time.perf_counter()
    x = _as_stream(tokens)
    V = vocab_size
    bits = word_bits(V)
    bounds = _chunks(x.shape[0], chunk_tokens)
    count_dtype = np.int32 if x.shape[0] < 2**31 else np.int64  # an n-gram occurs < tokens times
    single = len(bounds) == 1
    only_window = _window(x, 0, bounds[0][1], order, eos_id, V) if single else None

    def windows() -> Iterator[tuple[int, _Window]]:
        if only_window is not None:
            yield bounds[0][1], only_window
        else:
            for a, b in bounds:
                yield b, _window(x, a, b, order, eos_id, V)

    # order 1: raw counts (dense; slot = symbol)
    raw1 = np.zeros(V + 1, dtype=np.int64)
    for _, win in windows():
        raw1 += np.bincount(win.S[win.pred], minlength=V + 1)
    n_distinct = [int(np.count_nonzero(raw1[:V]))]
    builder = _KneserNey(V, order) if method == "kneser_ney" else _AddK(V, order, k)
    # threads > 1: the probabilities of order n - 1 are computed on a second thread while
    # order n + 1 is counted (numpy releases the GIL in its loops; they share only read-only
    # tables). Measured on a loaded 2-core machine it did not pay, hence off by default.
    from concurrent.futures import ThreadPoolExecutor

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
        counts: _Counts | None = None
        for win_end, win in windows():
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
            slots = counts.add(keys, hashes, need, win_end / max(x.shape[0], 1))
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
            if single:
                next_cache = (p, slots)
        if counts is None:
            counts = _Counts(0, count_dtype)
        remap = counts.compact()
        if single:
            p, slots = next_cache
            if remap is not None:
                slots = remap[slots]
            cache = (p, slots)
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
            logp1 = _log10(self.prob_prev)
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
        self.levels[n - 2].bo = np.where(is_ctx, _log10(np.where(is_ctx, ctx.imag, 1.0)), np.float32(0))
        del ctx, is_ctx
        logp = np.zeros(size, dtype=np.float32)
        logp[occ] = _log10(p)
        if not last:
            self.prob_prev = np.zeros(size)
            self.prob_prev[occ] = p
        del p
        lv.occ = None
        self.levels.append(Level(lv.table, logp, None if last else np.zeros(size, np.float32)))

    def finish(self) -> tuple[list[Level], dict]:
        if any(self.fallback):
            orders = [str(i + 1) for i, fb in enumerate(self.fallback) if fb]
            warnings.warn(
                f"Kneser-Ney: count-of-counts too small to estimate discounts for order(s) "
                f"{', '.join(orders)}; using the fallback {FALLBACK_DISCOUNTS}",
                RuntimeWarning,
                stacklevel=3,
            )
        return self.levels, {"discounts": self.discounts, "discount_fallback": self.fallback}


class _AddK:
    """Add-k estimates, one order at a time (each order needs only its own counts)."""

    def __init__(self, V: int, order: int, k: float):
        self.V, self.order, self.k, self.bits = V, order, k, word_bits(V)
        self.levels: list[Level] = []

    def push(self, n: int, table, raw, suffix) -> None:
        V, k, last = self.V, self.k, n == self.order
        if n == 1:
            c1 = raw[:V].astype(np.float64)
            logp1 = np.append(_log10((c1 + k) / (c1.sum() + k * V)), np.float32(NO_PROB))
            self.levels.append(Level(None, logp1.astype(np.float32), None if last else np.zeros(V + 1, np.float32)))
            return
        occ, pre = _occupied(table, self.bits)
        c = raw[occ].astype(np.float64)
        ctx_total = np.bincount(pre, weights=c, minlength=self.levels[-1].size)
        is_ctx = np.flatnonzero(ctx_total)
        self.levels[n - 2].bo[is_ctx] = _log10(k / (ctx_total[is_ctx] + k * V))
        logp = np.zeros(table.shape[0], dtype=np.float32)
        logp[occ] = _log10((c + k) / (ctx_total[pre] + k * V))
        self.levels.append(Level(table, logp, None if last else np.zeros(table.shape[0], np.float32)))

    def finish(self) -> tuple[list[Level], dict]:
        return self.levels, {"k": self.k}


# --------------------------------------------------------------------------- ARPA
def write_arpa(model: NgramModel, path: str | os.PathLike, compresslevel: int = 4) -> Path:
    """Write the model as an ARPA file (gzip when the name ends in .gz). See lmpipe/arpa.py."""
    from lmpipe.arpa import write_arpa as _write

    return _write(model, path, compresslevel=compresslevel)


def read_arpa(path: str | os.PathLike, **kwargs) -> NgramModel:
    """Read an ARPA file (ours or another toolkit's) into a scorer. See lmpipe/arpa.py."""
    from lmpipe.arpa import read_arpa as _read

    return _read(path, **kwargs)


# --------------------------------------------------------------------------- sampling
def sample_next(
    log10p: np.ndarray, rng: np.random.Generator, temperature: float = 1.0, top_k: int | None = None
) -> int:
    """Draw one token id from log10 probabilities with temperature and top-k.

    temperature 0 is greedy (argmax); top_k keeps the k most probable ids.
    """
    if temperature < 0:
        raise InputError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise InputError(f"top_k must be >= 1, got {top_k}")
    if temperature == 0:
        return int(np.argmax(log10p))
    logits = log10p * (LN10 / temperature)
    if top_k is not None and top_k < logits.shape[0]:
        cut = np.partition(logits, -top_k)[-top_k]
        logits = np.where(logits >= cut, logits, -np.inf)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    return int(rng.choice(p.shape[0], p=p))


def generate_ids(
    model: NgramModel,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    stop_at_eos: bool = True,
) -> list[int]:
    """Sample up to `max_new_tokens` ids after `prompt_ids` (a document start); returns new ids."""
    rng = np.random.default_rng(seed)
    ids = [int(t) for t in prompt_ids]
    new: list[int] = []
    for _ in range(max(0, int(max_new_tokens))):
        tok = sample_next(model.next_log10_distribution(ids), rng, temperature, top_k)
        if stop_at_eos and tok == model.eos_id:
            break
        ids.append(tok)
        new.append(tok)
    return new


def generate_text(
    model_dir: str | os.PathLike,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    tokenizer_dir: str | os.PathLike | None = None,
) -> str:
    """Prompt + a continuation sampled from the model in `model_dir` (text in, text out).

    The prompt is the start of a document (context <s> + prompt tokens); sampling stops at
    EOS or after `max_new_tokens`. The tokenizer comes from data/tokenizer (or
    `tokenizer_dir`).
    """
    from lmpipe.tokenizer import Tokenizer

    model = NgramModel.load(model_dir)
    tok = _load_tokenizer(Tokenizer, model_dir, tokenizer_dir)
    prompt_ids = list(tok.encode(prompt)) if prompt else []
    new = generate_ids(model, prompt_ids, max_new_tokens, temperature, top_k, seed)
    return tok.decode(prompt_ids + new)


def _load_tokenizer(cls, model_dir, tokenizer_dir):
    from lmpipe.paths import tokenizer_dir as default_dir

    candidates = [Path(tokenizer_dir)] if tokenizer_dir else []
    candidates += [default_dir(), Path(model_dir).resolve().parent.parent / "tokenizer"]
    for folder in candidates:
        if (folder / "tokenizer.model").exists():
            return cls.load(folder / "tokenizer.model")
    raise InputError(
        f"tokenizer not found (looked in {', '.join(str(c) for c in candidates)}); run `dvc repro tokenizer`"
    )

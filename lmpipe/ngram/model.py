"""Count-based n-gram language models on token-id streams: the model and its scorer.

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
the n-gram's id (see lmpipe/ngram/hashtable.py). Estimation and scoring work on whole arrays per
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
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from lmpipe.core.errors import InputError
from lmpipe.core.files import atomic_path
from lmpipe.core.names import NGRAM_FILE
from lmpipe.ngram import hashtable as nh
from lmpipe.ngram.npz import prefetch, read_npz, write_npz

METHODS = ("kneser_ney", "add_k")
FORMAT = "lmpipe-ngram"
FORMAT_VERSION = 1
SORTED_VERSION = 2  # a model with sorted levels: older code must refuse it, not misread it
LN10 = math.log(10.0)
NO_PROB = -99.0  # log10 "probability" of <s> (never predicted), the ARPA convention
FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)  # KenLM's --discount_fallback values
DEFAULT_CHUNK_TOKENS = 1 << 23
PREFETCH_TOKENS = 1 << 20  # scoring this many tokens reads a memory-mapped model ahead
MAX_ORDER = 10


@dataclass
class Level:
    """One order of the model.

    keys: uint64 hash table (None for order 1, which is dense: slot = symbol, V = <s>), or
          with `sorted`, the keys in increasing order (no empty slots: an n-gram's id is its
          rank; lmpipe/ngram/external.py builds these). Either way an id is what the next
          order's keys pack as their prefix.
    logp: float32 log10 p(w | context) of the n-gram in each slot.
    bo:   float32 per slot, used when the n-gram is a context of the next order: log10
          back-off weight (Kneser-Ney/ARPA) or log10 probability of an unseen word (add-k);
          0 when the n-gram is not a context. None at the highest order.
    """

    keys: np.ndarray | None
    logp: np.ndarray
    bo: np.ndarray | None
    sorted: bool = False

    @property
    def size(self) -> int:
        return self.logp.shape[0]

    def occupied(self) -> np.ndarray:
        if self.keys is None or self.sorted:
            return np.arange(self.logp.shape[0])
        return nh.occupied(self.keys)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """The id of each packed n-gram key at this level, or -1 where it is absent."""
        if self.sorted:
            return nh.sorted_lookup(self.keys, keys)
        return nh.lookup(self.keys, keys)


# --------------------------------------------------------------------------- the stream
@dataclass
class Window:
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


def stream_window(x: np.ndarray, a: int, b: int, order: int, eos: int, vocab: int) -> Window:
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
    return Window(S=S, d=d, pred=tok_pos[a - w0 :])


def chunk_bounds(n_tokens: int, chunk_tokens: int) -> list[tuple[int, int]]:
    if n_tokens == 0:
        return [(0, 0)]
    return [(a, min(a + chunk_tokens, n_tokens)) for a in range(0, n_tokens, chunk_tokens)]


def as_stream(ids) -> np.ndarray:
    """A 1-D integer token stream: an array or memmap as it is, a sharded view of several
    memory-mapped files (lmpipe/data/tokens.py's ShardedTokens) as it is (only the slices
    read are copied), anything else converted."""
    sliceable = hasattr(ids, "shape") and hasattr(ids, "dtype") and hasattr(ids, "__getitem__")
    arr = ids if isinstance(ids, np.ndarray) or sliceable else np.asarray(ids, dtype=np.int64)
    if len(arr.shape) != 1:
        raise InputError(f"a token stream must be 1-D, got shape {arr.shape}")
    if arr.shape[0] and not np.issubdtype(arr.dtype, np.integer):
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


def next_ids(level: Level, prev: np.ndarray, words: np.ndarray, vocab: int) -> np.ndarray:
    """Ids at `level` of (prefix id `prev`, last word `words`); -1 where absent or prev < 0."""
    out = np.full(prev.shape[0], -1, dtype=np.int64)
    ok = np.flatnonzero(prev >= 0)
    if ok.size and level.keys is not None:
        out[ok] = level.lookup(pack(prev[ok], words[ok], word_bits(vocab)))
    return out


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
        path = Path(path)
        target = path if path.suffix == ".npz" else path / NGRAM_FILE
        sorted_levels = [n for n, lv in enumerate(self.levels, start=1) if lv.sorted]
        info = {
            "format": FORMAT,
            "version": FORMAT_VERSION if not sorted_levels else SORTED_VERSION,
            "order": self.order,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "unk_id": self.unk_id,
            "bos_id": self.bos_id,
            "method": self.method,
            "meta": self.meta,
            **({"sorted_levels": sorted_levels} if sorted_levels else {}),
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
            write_npz(tmp, arrays)
        return target

    @classmethod
    def load(cls, path: str | os.PathLike, mmap: bool = False) -> "NgramModel":
        """Load a model saved by `save` (a folder holding model.npz, or the file itself);
        `mmap`: memory-map the arrays instead of reading them (for models larger than
        memory; only the pages a lookup touches are read). lmpipe/ngram/store.py's
        `load_ngram` also reads a folder holding only an ARPA file."""
        path = Path(path)
        target = path / NGRAM_FILE if path.is_dir() else path
        if not target.exists():
            raise InputError(f"{target}: n-gram model not found (run `dvc repro ngram`)")
        try:
            z = read_npz(target, mmap=mmap)
            info = json.loads(bytes(np.asarray(z["info"])).decode())
            if info.get("format") != FORMAT:
                raise InputError(f"{target}: not an lmpipe n-gram model")
            if info.get("version", 0) > SORTED_VERSION:
                raise InputError(f"{target}: model format {info['version']} is newer than this code")
            sorted_levels = set(info.get("sorted_levels", []))
            levels = [Level(keys=z.get(f"keys_{n}"), logp=z[f"logp_{n}"], bo=z.get(f"bo_{n}"),
                            sorted=n in sorted_levels) for n in range(1, int(info["order"]) + 1)]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
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
        x = as_stream(ids)
        n = x.shape[0]
        out = np.empty(n, dtype=np.float64)
        if n >= PREFETCH_TOKENS:  # a long stream reads most of a memory-mapped model
            for lv in self.levels:
                for arr in (lv.keys, lv.logp, lv.bo):
                    if arr is not None:
                        prefetch(arr)
        if threads > 1 and n >= (1 << 20):
            chunk_tokens = min(chunk_tokens, -(-n // threads))
        bounds = [(a, b) for a, b in chunk_bounds(n, chunk_tokens) if b > a]

        def work(ab: tuple[int, int]) -> None:
            a, b = ab
            out[a:b] = self._score_window(stream_window(x, a, b, self.order, self.eos_id, self.vocab_size))

        if threads > 1 and len(bounds) > 1:
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

    def _score_window(self, win: Window) -> np.ndarray:
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
            ids = level.lookup(pack(ctx, S[nxt], bits))
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
            cur = next_ids(self.levels[n - 1], cur, np.array([words[n - 1]]), self.vocab_size)
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
            ids = next_ids(level, np.full(V, hid, dtype=np.int64), words, V)
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

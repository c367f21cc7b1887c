"""ARPA back-off language model files: writer and reader for lmpipe's n-gram models.

Words are token ids written in decimal (`123`), except `<s>` (the context before a document),
`</s>` (the EOS id) and `<unk>` (the tokenizer's unknown id). Probabilities and back-off
weights are log10 float32 values in their shortest round-trip spelling, so reading a file
back gives bit-identical numbers. An interpolated Kneser-Ney model is exactly a back-off
model: the stored probability of a seen n-gram already includes the interpolated lower
orders and the back-off weight of a context is its interpolation weight gamma.

The writer puts one comment line before `\\data\\` (`# lmpipe-ngram {json}`: vocabulary size
and special ids); KenLM skips `#` lines there and SRILM ignores anything before `\\data\\`.
Files from other toolkits are read too (without that line the special ids are inferred or
passed in), including ones with missing prefixes (added as "blank" n-grams whose probability
is the backed-off one, as KenLM does).

Text is produced and parsed with pyarrow compute kernels over whole columns, so neither
direction loops in Python per n-gram.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lmpipe.core.errors import InputError
from lmpipe.core.files import atomic_path
from lmpipe.ngram import hashtable as nh
from lmpipe.ngram.model import (
    NO_PROB,
    Level,
    NgramModel,
    next_ids,
    pack,
    unpack,
    word_bits,
)

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
HEADER = "# lmpipe-ngram "
_BATCH = 1 << 20


# --------------------------------------------------------------------------- writing
def _vocab_strings(model: NgramModel) -> pa.Array:
    words = [str(i) for i in range(model.vocab_size)] + [BOS]
    words[model.eos_id] = EOS
    if model.unk_id is not None:
        words[model.unk_id] = UNK
    return pa.array(words, type=pa.string())


def _floats(values: np.ndarray) -> pa.Array:
    return pc.cast(pa.array(values.astype(np.float32)), pa.string())


def _write_lines(f, vocab: pa.Array, rows: np.ndarray, logp: np.ndarray, bo: np.ndarray | None) -> None:
    """Write `logp<TAB>w1 .. wn[<TAB>bo]` lines; bo is omitted where it is 0 (log10 of 1)."""
    for start in range(0, rows.shape[0], _BATCH):
        stop = min(start + _BATCH, rows.shape[0])
        cols = [pc.take(vocab, pa.array(rows[start:stop, i])) for i in range(rows.shape[1])]
        ngram = cols[0] if len(cols) == 1 else pc.binary_join_element_wise(*cols, " ")
        parts = [_floats(logp[start:stop]), ngram]
        if bo is not None:
            b = bo[start:stop]
            parts.append(pc.if_else(pa.array(b != 0), _floats(b), pa.scalar(None, pa.string())))
        line = pc.binary_join_element_wise(*parts, "\t", null_handling="skip")
        line = pc.binary_join_element_wise(line, pa.scalar(""), "\n")
        line = line.combine_chunks() if isinstance(line, pa.ChunkedArray) else line
        offsets = np.frombuffer(line.buffers()[1], dtype=np.int32)[line.offset : line.offset + len(line) + 1]
        data = line.buffers()[2]
        f.write(memoryview(data)[int(offsets[0]) : int(offsets[-1])])  # keeps `data` alive


class _BackgroundWriter:
    """Compress and write on a second thread (zlib releases the GIL) while the next batch of
    lines is formatted; at most two batches wait."""

    def __init__(self, f):
        self._f = f
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._pending = deque()

    def write(self, data) -> None:
        while len(self._pending) >= 2:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(self._f.write, data))

    def close(self) -> None:
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True)


def write_arpa(model: NgramModel, path: str | os.PathLike, compresslevel: int = 4) -> Path:
    """Write `model` as ARPA (gzip-compressed when `path` ends in .gz), atomically."""
    if not model.backoff:
        raise InputError(
            "an add-k model is not a back-off model and has no exact ARPA form "
            "(the probability of an unseen word is flat, not a weight times a lower order)"
        )
    path = Path(path)
    V = model.vocab_size
    vocab = _vocab_strings(model)
    counts = model.ngram_counts()
    counts[0] = V + 1  # every token id and <s>
    info = {
        "vocab_size": V,
        "eos_id": model.eos_id,
        "unk_id": model.unk_id,
        "bos_id": model.bos_id,
        "order": model.order,
        "method": model.method,
    }
    with atomic_path(path) as tmp:
        raw = open(tmp, "wb")
        gz = gzip.GzipFile(filename="", fileobj=raw, mode="wb", compresslevel=compresslevel, mtime=0) if path.suffix == ".gz" else None
        f = _BackgroundWriter(gz or raw)
        try:
            head = [HEADER + json.dumps(info, sort_keys=True), "", "\\data\\"]
            head += [f"ngram {n}={c}" for n, c in enumerate(counts, start=1)]
            f.write(("\n".join(head) + "\n").encode())
            # order 1: every id in id order, then <s>
            rows = np.arange(V + 1, dtype=np.int32)[:, None]
            lv = model.levels[0]
            f.write(b"\n\\1-grams:\n")
            _write_lines(f, vocab, rows, lv.logp, lv.bo)
            words_by_slot = rows
            for n in range(2, model.order + 1):
                lv = model.levels[n - 1]
                occ = lv.occupied()
                keys = lv.keys[occ]
                pre, last = unpack(keys, word_bits(V))
                rows = np.concatenate([words_by_slot[pre], last[:, None].astype(np.int32)], axis=1)
                f.write(f"\n\\{n}-grams:\n".encode())
                _write_lines(f, vocab, rows, lv.logp[occ], None if lv.bo is None else lv.bo[occ])
                if n < model.order:
                    words_by_slot = np.zeros((lv.size, n), dtype=np.int32)
                    words_by_slot[occ] = rows
                del rows
            f.write(b"\n\\end\\\n")
        finally:
            f.close()
            if gz is not None:
                gz.close()
            raw.close()
    return path


# --------------------------------------------------------------------------- reading
def _open_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            magic = f.read(2)
        if magic == b"\x1f\x8b":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: ARPA file not found") from None
    except (OSError, EOFError) as err:
        raise InputError(f"{path}: cannot read ({err})") from None


def _line_no(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def _split_section(data: bytes, start: int, stop: int) -> tuple[pa.Array, np.ndarray]:
    """Whitespace-split every non-blank line of data[start:stop]; (list array, line starts)."""
    buf = np.frombuffer(data, dtype=np.uint8, count=stop - start, offset=start)
    ends = np.flatnonzero(buf == 10) + 1
    if ends.size == 0 or ends[-1] != buf.size:
        ends = np.append(ends, buf.size)
    offsets = np.concatenate([[0], ends]).astype(np.int64)
    lines = pa.LargeStringArray.from_buffers(
        len(offsets) - 1, pa.py_buffer(offsets), pa.py_buffer(memoryview(data)[start:stop])
    )
    lines = pc.ascii_trim_whitespace(lines)
    keep = np.flatnonzero(pc.binary_length(lines).to_numpy(zero_copy_only=False) > 0)
    fields = pc.ascii_split_whitespace(lines.take(pa.array(keep)))
    return fields, offsets[keep] + start


def _find(data: bytes, marker: bytes, start: int, path: Path) -> int:
    pos = data.find(marker, start)
    if pos < 0:
        raise InputError(f"{path}: not an ARPA file ({marker.decode().strip()!r} not found)")
    return pos


def read_arpa(
    path: str | os.PathLike,
    vocab_size: int | None = None,
    eos_id: int | None = None,
    unk_id: int | None = None,
) -> NgramModel:
    """Read an ARPA file into an NgramModel with back-off scoring (KenLM's semantics).

    lmpipe's own files carry the vocabulary size and special ids; for other files they are
    taken from the arguments, else inferred (`</s>` and `<unk>` get the ids after the
    largest numeric word). Token ids missing from the unigrams score like `<unk>`.
    """
    path = Path(path)
    data = _open_bytes(path)
    info, counts, pos = _read_header(data, path)
    sections = []   # per order: (log10 p, word strings per position, back-off weight)
    for n in range(1, len(counts) + 1):
        logp, words, bo, pos = _read_section(data, n, counts[n], pos, path)
        sections.append((logp, words, bo))
    uni_words = sections[0][1][0]
    ids, V, eos, unk = _word_ids(uni_words.to_pylist(), info, vocab_size, eos_id, unk_id, path)

    def to_ids(col: pa.Array, n: int) -> np.ndarray:
        idx = pc.index_in(col, value_set=uni_words)
        if idx.null_count:
            raise InputError(f"{path}: a {n}-gram uses a word that is not among the 1-grams")
        return ids[idx.to_numpy(zero_copy_only=False).astype(np.int64)]

    rows = [None] + [np.stack([to_ids(w, n) for w in sec[1]], axis=1)
                     for n, sec in enumerate(sections[1:], 2)]
    # order 1: dense; ids absent from the file score like <unk> (KenLM's mapping)
    logp1 = np.full(V + 1, NO_PROB, dtype=np.float32)
    bo1 = np.zeros(V + 1, dtype=np.float32)
    if unk is not None and unk in set(ids.tolist()):
        logp1[:V] = sections[0][0][np.flatnonzero(ids == unk)[0]]
    logp1[ids] = sections[0][0]
    bo1[ids] = sections[0][2]
    levels = [Level(None, logp1, bo1 if len(counts) > 1 else None)]
    logps = [None] + [sec[0] for sec in sections[1:]]
    bos = [None] + [sec[2] for sec in sections[1:]]
    del sections
    model = NgramModel(levels, V, eos, unk_id=unk, bos_id=info.get("bos_id"),
                       method=info.get("method", "arpa"))
    try:
        _assemble(model, rows, logps, bos, None, path)
    except _MissingPrefix:
        # some n-gram's prefix is not in the file (pruned elsewhere): add the missing prefixes
        # as blank n-grams, top-down, and build again
        del levels[1:]
        blank = [None] + [np.zeros(len(lp), dtype=bool) for lp in logps[1:]]
        for n in range(len(counts), 2, -1):
            missing = _missing_rows(rows[n - 2], rows[n - 1][:, :-1], V)
            if missing.shape[0]:
                rows[n - 2] = np.concatenate([rows[n - 2], missing])
                logps[n - 2] = np.concatenate([logps[n - 2], np.zeros(missing.shape[0], np.float32)])
                bos[n - 2] = np.concatenate([bos[n - 2], np.zeros(missing.shape[0], np.float32)])
                blank[n - 2] = np.concatenate([blank[n - 2], np.ones(missing.shape[0], dtype=bool)])
        _assemble(model, rows, logps, bos, blank, path)
    return model


def _read_header(data: bytes, path: Path) -> tuple[dict, dict[int, int], int]:
    """(lmpipe's own header info, n-gram count per order, offset of the 1-grams section)."""
    start = _find(data, b"\\data\\", 0, path)
    info: dict = {}
    for line in data[:start].decode("utf-8", "replace").splitlines():
        if line.startswith(HEADER):
            try:
                info = json.loads(line[len(HEADER) :])
            except json.JSONDecodeError:
                raise InputError(f"{path}: line 1: bad lmpipe header") from None
    first_section = _find(data, b"\\1-grams:", start, path)
    counts = {int(m.group(1)): int(m.group(2))
              for m in re.finditer(rb"ngram\s+(\d+)\s*=\s*(\d+)", data[start:first_section])}
    if not counts or sorted(counts) != list(range(1, len(counts) + 1)):
        raise InputError(f"{path}: bad \\data\\ section (ngram counts {counts})")
    return info, counts, first_section


def _read_section(data: bytes, n: int, count: int, pos: int, path: Path):
    """The `\\n-grams:` section at or after `pos`: (log10 p, n word columns, back-off weights,
    offset where the section ends)."""
    head = _find(data, f"\\{n}-grams:".encode(), pos, path)
    body = data.index(b"\n", head) + 1
    nxt = data.find(b"\n\\", body)
    stop = nxt + 1 if nxt >= 0 else len(data)
    fields, line_starts = _split_section(data, body, stop)
    lengths = pc.list_value_length(fields).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero((lengths != n + 1) & (lengths != n + 2))
    if bad.size:
        raise InputError(f"{path}: line {_line_no(data, int(line_starts[bad[0]]))}: expected {n} "
                         "words between a probability and an optional back-off weight")
    if len(fields) != count:
        raise InputError(f"{path}: \\{n}-grams: has {len(fields)} entries, the header says {count}")
    flat = fields.flatten()
    offs = np.asarray(fields.offsets)[:-1].astype(np.int64) - int(np.asarray(fields.offsets)[0])

    def column(i, rows=None):
        idx = offs + i if rows is None else offs[rows] + i
        return pc.take(flat, pa.array(idx))

    def floats(arr, what):
        try:
            return pc.cast(arr, pa.float32()).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            raise InputError(f"{path}: \\{n}-grams: bad {what} ({err})") from None

    logp = floats(column(0), "log10 probability")
    bo = np.zeros(len(fields), dtype=np.float32)
    with_bo = np.flatnonzero(lengths == n + 2)
    if with_bo.size:
        bo[with_bo] = floats(column(n + 1, with_bo), "back-off weight")
    return logp, [column(1 + i) for i in range(n)], bo, stop


def _word_ids(names: list[str], info: dict, vocab_size, eos_id, unk_id, path: Path):
    """The token id of each 1-gram word, and the vocabulary size, EOS and UNK ids."""
    numeric = [int(w) for w in names if w.isdigit()]
    others = [w for w in names if not w.isdigit() and w not in (BOS, EOS, UNK)]
    if others:
        raise InputError(f"{path}: word {others[0]!r} is not a token id (nor <s>, </s>, <unk>)")
    top = max(numeric) + 1 if numeric else 0
    V = info.get("vocab_size", vocab_size)
    eos = info.get("eos_id", eos_id)
    unk = info.get("unk_id", unk_id)
    if eos is None:
        eos, top = top, top + 1
    if unk is None and UNK in names:
        unk, top = top, top + 1
    if V is None:
        V = max(top, eos + 1, (unk + 1) if unk is not None else 0)
    if numeric and max(numeric) >= V:
        raise InputError(f"{path}: token id {max(numeric)} is outside the vocabulary size {V}")
    ids = np.asarray([V if w == BOS else eos if w == EOS else unk if w == UNK else int(w)
                      for w in names], dtype=np.int64)
    if np.unique(ids).shape[0] != ids.shape[0]:
        raise InputError(f"{path}: a word appears twice among the 1-grams")
    return ids, V, eos, unk


class _MissingPrefix(Exception):
    pass


def _assemble(model: NgramModel, rows, logps, bos, blank, path) -> None:
    """Build the hash tables of orders 2.. from word-id rows (order 1 already in place)."""
    V, order = model.vocab_size, len(rows)
    levels = model.levels
    for n in range(2, order + 1):
        r = rows[n - 1]
        prefix = r[:, 0].copy()
        for m in range(2, n):
            prefix = next_ids(levels[m - 1], prefix, np.ascontiguousarray(r[:, m - 1]), V)
        if (prefix < 0).any():
            raise _MissingPrefix()
        keys = pack(prefix, np.ascontiguousarray(r[:, -1]), word_bits(V))
        table = nh.empty_table(nh.table_size(r.shape[0]))
        slots = nh.insert(table, keys, fresh=True)
        if np.count_nonzero(table != nh.EMPTY) != r.shape[0]:
            raise InputError(f"{path}: a {n}-gram appears twice")
        logp = np.zeros(table.shape[0], dtype=np.float32)
        logp[slots] = logps[n - 1]
        bo = None
        if n < order:
            bo = np.zeros(table.shape[0], dtype=np.float32)
            bo[slots] = bos[n - 1]
        levels.append(Level(table, logp, bo))
        if blank is not None and blank[n - 1].any():  # a blank scores like a backed-off n-gram
            b = np.flatnonzero(blank[n - 1])
            logp[slots[b]] = _backed_off(model, r[b])


def _backed_off(model: NgramModel, rows: np.ndarray) -> np.ndarray:
    """log10 p(w | h) for rows (h.., w) of length n using only orders below n (+ bo of h)."""
    V = model.vocab_size
    n = rows.shape[1]
    res = model.levels[0].logp[rows[:, -1]].astype(np.float64)
    for c in range(1, n):  # context length
        s = n - 1 - c
        ctx = rows[:, s].copy()
        for m in range(2, c + 1):
            ctx = next_ids(model.levels[m - 1], ctx, rows[:, s + m - 1], V)
        has = ctx >= 0
        if c + 1 < n:
            found = next_ids(model.levels[c], ctx, rows[:, -1], V)
        else:
            found = np.full(rows.shape[0], -1, dtype=np.int64)
        ok = found >= 0
        lp = model.levels[c].logp[np.where(ok, found, 0)] if c + 1 < n else 0.0
        res = np.where(ok, lp, np.where(has, res + model.levels[c - 1].bo[np.maximum(ctx, 0)], res))
    return np.minimum(res, 0.0).astype(np.float32)


def _missing_rows(existing: np.ndarray, wanted: np.ndarray, V: int) -> np.ndarray:
    """Unique rows of `wanted` that are not rows of `existing` (same width)."""
    both = np.concatenate([existing, wanted])
    code = both[:, 0].astype(np.int64)
    for i in range(1, both.shape[1]):
        code = np.unique(code * (V + 1) + both[:, i], return_inverse=True)[1].reshape(-1)
    have = code[: existing.shape[0]]
    want = code[existing.shape[0] :]
    sel = ~np.isin(want, have)
    if not sel.any():
        return np.zeros((0, existing.shape[1]), dtype=np.int64)
    _, first = np.unique(want[sel], return_index=True)
    return wanted[np.flatnonzero(sel)[first]]

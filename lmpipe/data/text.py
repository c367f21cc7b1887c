"""From raw bytes to documents to contiguous train/val/test splits.

Decoding is strict: a byte sequence that is not valid in the configured encoding is an
error naming the file and the byte offset, never a silent replacement character. Newlines
are normalised to LF. The corpus is split into three contiguous blocks cut at line
boundaries, so no line is ever in two splits; a document that straddles a cut becomes one
row (a fragment) in each split, and joining a document's fragments gives it back exactly.
"""

from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lmpipe.core.errors import InputError

SPLITS = ("train", "val", "test")

_START = re.compile(r"^\*\*\*\s*START OF[^\n]*(?:\n|$)", re.MULTILINE | re.IGNORECASE)
_END = re.compile(r"^\*\*\*\s*END OF", re.MULTILINE | re.IGNORECASE)


# ----------------------------------------------------------------------------- decoding
def normalize_newlines(text: str) -> str:
    """CRLF (and a lone CR) -> LF."""
    if "\r" not in text:
        return text
    return text.replace("\r\n", "\n").replace("\r", "\n")


def decode(data: bytes, encoding: str, label: str) -> str:
    """Strictly decode `data`; a NUL byte or an invalid sequence names `label` and the offset."""
    codec = codecs.lookup(encoding).name
    if not codec.startswith(("utf-16", "utf-32")):
        nul = data.find(b"\x00")
        if nul != -1:
            raise InputError(
                f"{label}: looks like a binary file (NUL byte at byte offset {nul}), not {encoding} text"
            )
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as err:
        bad = data[err.start : min(err.end, err.start + 4)].hex(" ")
        hint = (
            "; if the file uses another encoding, name it in download.encoding (e.g. latin-1)"
            if codec == "utf-8"
            else ""
        )
        raise InputError(
            f"{label}: not valid {encoding} at byte offset {err.start} (byte(s) {bad}: {err.reason}){hint}"
        ) from None
    return normalize_newlines(text.removeprefix("\ufeff"))


def strip_gutenberg(text: str) -> str:
    """Keep what lies between '*** START OF ...' and '*** END OF ...' (when present)."""
    if m := _START.search(text):
        text = text[m.end() :]
    if m := _END.search(text):
        text = text[: m.start()]
    text = text.strip("\n")
    return text + "\n" if text else ""


# ----------------------------------------------------------------------------- documents
def read_documents(
    path: Path,
    label: str,
    *,
    encoding: str = "utf-8",
    text_field: str = "text",
    separator: str | None = None,
    gutenberg: bool = False,
) -> list[str]:
    """The documents of one .txt/.jsonl/.parquet file (blank documents dropped).

    A .txt file is one document, or several cut at `separator`; a .jsonl line or a parquet
    row is one document, its text in `text_field`.
    """
    suffix = path.suffix.lower() if path.suffix else Path(label).suffix.lower()
    if suffix == ".txt":
        text = decode(path.read_bytes(), encoding, label)
        if gutenberg:
            text = strip_gutenberg(text)
        docs = [text] if separator is None else [d.strip("\n") for d in text.split(separator)]
    elif suffix == ".jsonl":
        docs = []
        for lineno, obj in iter_jsonl(path, label, encoding):
            value = obj.get(text_field)
            if value is None:
                raise InputError(
                    f"{label}:{lineno}: no {text_field!r} field (set download.text_field)"
                )
            if not isinstance(value, str):
                raise InputError(f"{label}:{lineno}: {text_field!r} is {type(value).__name__}, not text")
            docs.append(normalize_newlines(value))
    elif suffix == ".parquet":
        docs = [normalize_newlines(t) for t in read_parquet_column(path, label, text_field)]
    else:
        raise InputError(f"{label}: unsupported file type {suffix or '(none)'!r}; "
                         "use .txt, .jsonl or .parquet (or an archive of them)")
    return [d for d in docs if d.strip()]


def iter_jsonl(path: Path, label: str, encoding: str = "utf-8"):
    """(line number, object) for each non-blank line; bad JSON names the file and line."""
    text = decode(path.read_bytes(), encoding, label)
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{label}:{lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(obj, dict):
            raise InputError(f"{label}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def read_parquet_column(path: Path, label: str, column: str) -> list[str]:
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise InputError(f"{label}: not a readable parquet file ({err})") from None
    if column not in schema.names:
        raise InputError(
            f"{label}: no column {column!r} (columns: {', '.join(schema.names)}; set download.text_field)"
        )
    values = pq.read_table(path, columns=[column]).column(column).to_pylist()
    for i, v in enumerate(values):
        if v is not None and not isinstance(v, str):
            raise InputError(f"{label}: row {i}: {column!r} is {type(v).__name__}, not text")
    return [v for v in values if v is not None]


# ----------------------------------------------------------------------------- splitting
def _lines(doc: str) -> list[str]:
    """The lines of `doc`, each keeping its '\\n'; ''.join(_lines(d)) == d."""
    parts = doc.split("\n")
    out = [p + "\n" for p in parts[:-1]]
    if parts[-1]:
        out.append(parts[-1])
    return out


@dataclass
class SplitStats:
    bytes: int
    lines: int
    documents: int


class LineIndex:
    """Every line of the corpus in order, with its document and the running byte count."""

    def __init__(self, docs: list[str]):
        self.lines: list[str] = []
        doc_of: list[int] = []
        for i, doc in enumerate(docs):
            ls = _lines(doc)
            self.lines.extend(ls)
            doc_of.extend([i] * len(ls))
        self.doc_of = np.asarray(doc_of, dtype=np.int64)
        sizes = np.fromiter((len(s.encode("utf-8")) for s in self.lines), np.int64, len(self.lines))
        # boundary[k] = bytes in the first k lines
        self.boundary = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def __len__(self) -> int:
        return len(self.lines)

    @property
    def total_bytes(self) -> int:
        return int(self.boundary[-1])

    def nearest_cut(self, target: float, lo: int, hi: int) -> int:
        """The line count k in [lo, hi] whose byte boundary is nearest to `target`."""
        k = int(np.searchsorted(self.boundary, target))
        best = min(
            (c for c in (k - 1, k) if lo <= c <= hi),
            key=lambda c: abs(self.boundary[c] - target),
            default=None,
        )
        return best if best is not None else (lo if k < lo else hi)

    def rows(self, start: int, stop: int) -> list[str]:
        """Lines [start, stop) regrouped into one row per document (fragment)."""
        out: list[str] = []
        current = -1
        for k in range(start, stop):
            d = int(self.doc_of[k])
            if d != current:
                out.append(self.lines[k])
                current = d
            else:
                out[-1] += self.lines[k]
        return out


def truncate_documents(docs: list[str], max_bytes: int) -> list[str]:
    """The first `max_bytes` UTF-8 bytes of the corpus, cut at a line boundary (>= 1 line)."""
    index = LineIndex(docs)
    if index.total_bytes <= max_bytes:
        return docs
    k = max(1, int(np.searchsorted(index.boundary, max_bytes, side="right")) - 1)
    return index.rows(0, k)


def split_documents(docs: list[str], fractions: tuple[float, float, float]) -> dict[str, list[str]]:
    """Three contiguous blocks of lines, cut at the line boundaries nearest the byte fractions."""
    index = LineIndex(docs)
    n = len(index)
    if n < 3:
        raise InputError(
            f"the corpus has {n} line(s); splitting into train/val/test needs at least 3"
        )
    total = index.total_bytes
    train, val, _ = fractions
    k1 = index.nearest_cut(total * train, 1, n - 2)
    k2 = index.nearest_cut(total * (train + val), k1 + 1, n - 1)
    return {
        "train": index.rows(0, k1),
        "val": index.rows(k1, k2),
        "test": index.rows(k2, n),
    }


def split_stats(rows: list[str]) -> SplitStats:
    n_bytes = sum(len(r.encode("utf-8")) for r in rows)
    n_lines = sum(r.count("\n") + (0 if r.endswith("\n") else 1) for r in rows)
    return SplitStats(bytes=n_bytes, lines=n_lines, documents=len(rows))

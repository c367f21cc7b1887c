"""Raw corpus files read as a stream of documents, never whole (unless one is a document).

A corpus may be far larger than memory, so every reader works a block at a time:

* text is decoded with an incremental decoder over 1 MiB blocks, as strictly as
  lmpipe/data/text.py's `decode` (a NUL byte or an invalid sequence names the file and the
  byte offset counted from the start of the file); CRLF and lone CR become LF, also when a
  CR ends one block and its LF starts the next;
* a .txt file with `download.document_separator` yields its documents as the separator
  is found; without one the whole file is one document (it is held whole: cut a large file
  into documents with a separator), and `strip_gutenberg` needs the whole text too (books);
* a .jsonl file is read line by line (errors name the line); a .parquet file one record
  batch at a time (errors name the row).

Blank documents are dropped. What comes out is exactly what reading the file whole gave.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from lmpipe.core.errors import InputError
from lmpipe.data.text import decode, normalize_newlines, strip_gutenberg

BLOCK_BYTES = 1 << 20       # raw bytes decoded at a time
PARQUET_BATCH_ROWS = 2048   # rows of an input .parquet file read at a time


def iter_decoded(path: Path, encoding: str, label: str) -> Iterator[str]:
    """The text of `path` in pieces: decoded strictly, BOM dropped, newlines normalised."""
    codec = codecs.lookup(encoding)
    check_nul = not codec.name.startswith(("utf-16", "utf-32"))
    decoder = codec.incrementaldecoder("strict")
    offset = 0          # bytes of the file before the current block
    carry = ""          # a CR at the end of a piece, until we know whether LF follows
    first = True
    with open(path, "rb") as f:
        while True:
            block = f.read(BLOCK_BYTES)
            final = not block
            if check_nul and (nul := block.find(b"\x00")) != -1:
                raise InputError(f"{label}: looks like a binary file (NUL byte at byte offset "
                                 f"{offset + nul}), not {encoding} text")
            pending = len(decoder.getstate()[0])
            try:
                text = decoder.decode(block, final=final)
            except UnicodeDecodeError as err:
                raise InputError(_decode_error(err, offset - pending, encoding, codec.name, label)) from None
            offset += len(block)
            if first and text:
                text = text.removeprefix("\ufeff")
                first = False
            text = carry + text
            carry = ""
            if text.endswith("\r") and not final:
                text, carry = text[:-1], "\r"
            if text:
                yield normalize_newlines(text)
            if final:
                return


def _decode_error(err: UnicodeDecodeError, base: int, encoding: str, codec: str, label: str) -> str:
    bad = err.object[err.start: min(err.end, err.start + 4)].hex(" ")
    hint = ("; if the file uses another encoding, name it in download.encoding (e.g. latin-1)"
            if codec == "utf-8" else "")
    return (f"{label}: not valid {encoding} at byte offset {base + err.start} "
            f"(byte(s) {bad}: {err.reason}){hint}")


def _split_stream(pieces: Iterator[str], separator: str) -> Iterator[str]:
    """The parts of a text given in pieces, cut at `separator`. A part spanning many pieces
    is joined once, when its end is found (never re-copied per piece)."""
    held: list[str] = []    # pieces of the current part
    tail = ""               # its last len(separator) - 1 characters
    keep = len(separator) - 1
    for piece in pieces:
        if separator not in tail + piece:
            held.append(piece)
            tail = (tail + piece)[-keep:] if keep else ""
            continue
        parts = ("".join(held) + piece).split(separator)
        last = parts.pop()
        yield from parts
        held, tail = [last], last[-keep:] if keep else ""
    yield "".join(held)


def iter_lines(pieces: Iterator[str]) -> Iterator[str]:
    """Lines (without their '\\n') of a text given in pieces; the last one may be empty."""
    return _split_stream(pieces, "\n")


def iter_jsonl(path: Path, label: str, encoding: str = "utf-8") -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; bad JSON names the file and line."""
    for lineno, line in enumerate(iter_lines(iter_decoded(path, encoding, label)), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{label}:{lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(obj, dict):
            raise InputError(f"{label}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def _jsonl_documents(path: Path, label: str, encoding: str, text_field: str) -> Iterator[str]:
    for lineno, obj in iter_jsonl(path, label, encoding):
        value = obj.get(text_field)
        if value is None:
            raise InputError(f"{label}:{lineno}: no {text_field!r} field (set download.text_field)")
        if not isinstance(value, str):
            raise InputError(f"{label}:{lineno}: {text_field!r} is {type(value).__name__}, not text")
        yield normalize_newlines(value)


def _parquet_documents(path: Path, label: str, column: str) -> Iterator[str]:
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise InputError(f"{label}: not a readable parquet file ({err})") from None
    names = pf.schema_arrow.names
    if column not in names:
        raise InputError(f"{label}: no column {column!r} (columns: {', '.join(names)}; "
                         "set download.text_field)")
    row = 0
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[column]):
        for i, v in enumerate(batch.column(0).to_pylist()):
            if v is None:
                continue
            if not isinstance(v, str):
                raise InputError(f"{label}: row {row + i}: {column!r} is {type(v).__name__}, not text")
            yield normalize_newlines(v)
        row += batch.num_rows


def _txt_documents(path: Path, label: str, encoding: str, separator: str | None,
                   gutenberg: bool) -> Iterator[str]:
    if separator is None or gutenberg:
        text = decode(path.read_bytes(), encoding, label)
        if gutenberg:
            text = strip_gutenberg(text)
        if separator is None:
            yield text
        else:
            yield from (d.strip("\n") for d in text.split(separator))
        return
    yield from (d.strip("\n") for d in _split_stream(iter_decoded(path, encoding, label), separator))


def iter_documents(path: Path, label: str, *, encoding: str = "utf-8", text_field: str = "text",
                   separator: str | None = None, gutenberg: bool = False) -> Iterator[str]:
    """The non-blank documents of one .txt/.jsonl/.parquet file, one at a time.

    A .txt file is one document, or several cut at `separator`; a .jsonl line or a parquet
    row is one document, its text in `text_field`.
    """
    suffix = path.suffix.lower() if path.suffix else Path(label).suffix.lower()
    if suffix == ".txt":
        docs = _txt_documents(path, label, encoding, separator, gutenberg)
    elif suffix == ".jsonl":
        docs = _jsonl_documents(path, label, encoding, text_field)
    elif suffix == ".parquet":
        docs = _parquet_documents(path, label, text_field)
    else:
        raise InputError(f"{label}: unsupported file type {suffix or '(none)'!r}; "
                         "use .txt, .jsonl or .parquet (or an archive of them)")
    for doc in docs:
        if doc.strip():
            yield doc

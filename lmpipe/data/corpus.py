"""The published data files: data/corpus/<split>/part-NNNNN.parquet (column `text`, one
document per row) and data/instruct/<split>.parquet (columns `prompt`, `response`).

A corpus split is a folder of Parquet shards of about `download.shard_bytes` of text each,
the layout of a Hub dataset (and of nanoGPT's or FineWeb's shards): the download stage
writes them as the documents stream in, the tokenizer stage encodes the shards in parallel,
and no reader ever holds a whole split. Rows are written in row groups of about
ROW_GROUP_BYTES, so a reader's batch stays small whatever the shard size. Every reader
checks the columns and types and names the file and row at fault.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from lmpipe.core.errors import InputError
from lmpipe.core.files import md5_file
from lmpipe.core.names import CORPUS_SUFFIX, shard_file

INSTRUCT_COLUMNS = ("prompt", "response")
ROW_GROUP_BYTES = 4 << 20


def write_columns(path: str | os.PathLike, columns: dict[str, list[str]]) -> None:
    """One Parquet file of string columns (the caller publishes it atomically)."""
    pq.write_table(pa.table({k: pa.array(v, type=pa.string()) for k, v in columns.items()}),
                   path)


# ----------------------------------------------------------------------------- corpus shards
@dataclass
class ShardInfo:
    """One written shard: its file and the UTF-8 bytes, lines and documents it holds."""

    path: Path
    bytes: int = 0
    lines: int = 0
    documents: int = 0


def line_count(doc: str) -> int:
    """Lines of a document: every '\\n' ends one, and a last line may lack it."""
    return doc.count("\n") + (0 if doc.endswith("\n") else 1) if doc else 0


class ShardWriter:
    """Documents -> `folder`/part-NNNNN.parquet, a new shard once one holds `shard_bytes`.

    A shard ends at a document boundary; `close()` returns what was written.
    """

    def __init__(self, folder: Path, shard_bytes: int, first_index: int = 0):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shard_bytes = int(shard_bytes)
        self.first_index = int(first_index)
        self.shards: list[ShardInfo] = []
        self._writer: pq.ParquetWriter | None = None
        self._rows: list[str] = []
        self._row_bytes = 0

    def add(self, doc: str, n_bytes: int | None = None, n_lines: int | None = None) -> None:
        if self._writer is None:
            path = self.folder / shard_file(self.first_index + len(self.shards), CORPUS_SUFFIX)
            self._writer = pq.ParquetWriter(path, pa.schema([("text", pa.string())]))
            self.shards.append(ShardInfo(path))
        info = self.shards[-1]
        n_bytes = len(doc.encode("utf-8")) if n_bytes is None else n_bytes
        info.bytes += n_bytes
        info.lines += line_count(doc) if n_lines is None else n_lines
        info.documents += 1
        self._rows.append(doc)
        self._row_bytes += n_bytes
        if self._row_bytes >= ROW_GROUP_BYTES:
            self._flush_rows()
        if info.bytes >= self.shard_bytes:
            self._close_shard()

    def _flush_rows(self) -> None:
        if self._rows:
            assert self._writer is not None
            self._writer.write_table(pa.table({"text": pa.array(self._rows, pa.string())}))
        self._rows, self._row_bytes = [], 0

    def _close_shard(self) -> None:
        self._flush_rows()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> list[ShardInfo]:
        self._close_shard()
        return self.shards


def split_shards(folder: str | os.PathLike) -> list[Path]:
    """The shards of one corpus split folder, in order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: corpus split not found; run `dvc repro download`")
    shards = sorted(folder.glob(f"part-*{CORPUS_SUFFIX}"))
    if not shards:
        raise InputError(f"{folder}: no {CORPUS_SUFFIX} shards in this corpus split; "
                         "run `dvc repro download`")
    return shards


def split_digest(folder: str | os.PathLike) -> str:
    """md5 of a split: of its one shard, or of the `md5  name` lines of its shards."""
    shards = split_shards(folder)
    if len(shards) == 1:
        return md5_file(shards[0])
    lines = "".join(f"{md5_file(p)}  {p.name}\n" for p in shards)
    return hashlib.md5(lines.encode("utf-8")).hexdigest()


def _open(path: Path) -> pq.ParquetFile:
    try:
        pf = pq.ParquetFile(path)
    except FileNotFoundError:
        raise InputError(f"{path}: corpus split not found; run `dvc repro download`") from None
    except Exception as err:
        raise InputError(f"{path}: not a readable Parquet file ({err})") from None
    if "text" not in pf.schema_arrow.names:
        raise InputError(f"{path}: no `text` column (columns: {', '.join(pf.schema_arrow.names)})")
    return pf


def iter_text_batches(path: str | os.PathLike, batch_size: int = 4096,
                      row_groups: range | None = None) -> Iterator[list[str]]:
    """The `text` column of a corpus shard, or of every shard of a split folder, in batches
    of documents; `row_groups`: only those row groups of one shard."""
    path = Path(path)
    for shard in split_shards(path) if path.is_dir() else [path]:
        pf = _open(shard)
        groups = list(row_groups) if row_groups is not None else None
        row = sum(pf.metadata.row_group(i).num_rows for i in range(groups[0])) if groups else 0
        for batch in pf.iter_batches(batch_size=batch_size, columns=["text"], row_groups=groups):
            texts = batch.column(0).to_pylist()
            for i, t in enumerate(texts):
                if not isinstance(t, str):
                    raise InputError(f"{shard}: row {row + i}: `text` is {t!r}, expected a string")
            row += len(texts)
            yield texts


def row_group_sizes(path: str | os.PathLike) -> list[int]:
    """The uncompressed bytes of each row group of a shard (about its text)."""
    meta = _open(Path(path)).metadata
    return [meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)]


def iter_texts(path: str | os.PathLike, batch_size: int = 4096) -> Iterator[str]:
    for batch in iter_text_batches(path, batch_size):
        yield from batch


def read_texts(path: str | os.PathLike) -> list[str]:
    """Every document of one shard (a shard is bounded by `download.shard_bytes`)."""
    return list(iter_texts(path))


def preview(folder: str | os.PathLike, rows: int = 1000):
    """The first `rows` documents of a split as a pandas frame (MLflow's dataset preview)."""
    pf = _open(split_shards(folder)[0])
    batch = next(pf.iter_batches(batch_size=rows, columns=["text"]), None)
    table = pa.Table.from_batches([batch]) if batch is not None else pf.schema_arrow.empty_table()
    return table.to_pandas()


def read_instruct_rows(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(prompt, response) rows of data/instruct/<split>.parquet; bad rows raise InputError."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: instruction data not found; run `dvc repro download`")
    try:
        table = pq.read_table(path)
    except Exception as err:
        raise InputError(f"{path}: not a readable Parquet file ({err})") from None
    missing = [c for c in INSTRUCT_COLUMNS if c not in table.column_names]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)} "
                         f"(columns: {', '.join(table.column_names)})")
    rows = []
    prompts, responses = (table.column(c).to_pylist() for c in INSTRUCT_COLUMNS)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        for name, v in (("prompt", p), ("response", r)):
            if not isinstance(v, str):
                raise InputError(f"{path}: row {i}: `{name}` is {v!r}, expected a string")
        if not r:
            raise InputError(f"{path}: row {i}: `response` is empty (nothing to learn)")
        rows.append((p, r))
    if not rows:
        raise InputError(f"{path}: no rows")
    return rows

"""The published data files: data/corpus/<split>.parquet (column `text`, one document per row)
and data/instruct/<split>.parquet (columns `prompt`, `response`).

The download stage writes them; the tokenizer stage reads the corpus in batches of documents
(never the whole split at once) and the finetuning stages read the instruction rows. Every
reader checks the columns and types and names the file and row at fault.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from lmpipe.core.errors import InputError

INSTRUCT_COLUMNS = ("prompt", "response")


def write_columns(path: str | os.PathLike, columns: dict[str, list[str]]) -> None:
    """One Parquet file of string columns (the caller publishes it atomically)."""
    pq.write_table(pa.table({k: pa.array(v, type=pa.string()) for k, v in columns.items()}),
                   path)


def iter_text_batches(path: str | os.PathLike, batch_size: int = 4096) -> Iterator[list[str]]:
    """The `text` column of a corpus split, in batches of documents."""
    path = Path(path)
    try:
        pf = pq.ParquetFile(path)
    except FileNotFoundError:
        raise InputError(f"{path}: corpus split not found; run `dvc repro download`") from None
    except Exception as err:
        raise InputError(f"{path}: not a readable Parquet file ({err})") from None
    if "text" not in pf.schema_arrow.names:
        raise InputError(f"{path}: no `text` column (columns: {', '.join(pf.schema_arrow.names)})")
    row = 0
    for batch in pf.iter_batches(batch_size=batch_size, columns=["text"]):
        texts = batch.column(0).to_pylist()
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InputError(f"{path}: row {row + i}: `text` is {t!r}, expected a string")
        row += len(texts)
        yield texts


def iter_texts(path: str | os.PathLike, batch_size: int = 4096) -> Iterator[str]:
    for batch in iter_text_batches(path, batch_size):
        yield from batch


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

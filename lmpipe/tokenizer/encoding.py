"""Encoding the corpus into token shards, in parallel processes.

Each corpus shard (data/corpus/<split>/part-NNNNN.parquet) becomes one token shard
(data/tokens/<split>/part-NNNNN.bin, lmpipe/data/tokens.py). The work is cut finer than
shards, into pieces of a few Parquet row groups (about PIECE_BYTES of text), so that
`workers` processes stay busy to the end however few shards there are (30 shards over 16
workers would leave half of them idle for the last round); a shard's pieces are then joined
in order. Each process runs sentencepiece on one thread: the Python work around the library
(reading Parquet into strings, flattening the ids into an array, writing them) then runs in
parallel too, which sentencepiece's own threads cannot give, and a process holds one batch of
documents at a time, so memory does not grow with the corpus. The largest pieces go first.

A small corpus (under POOL_MIN_BYTES) is encoded in this process with sentencepiece's threads
instead. The ids do not depend on how the work is cut or on the thread count, so the files
are byte-identical whatever the number of workers (tested).
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from lmpipe.core.console import Progress
from lmpipe.data.corpus import iter_text_batches, row_group_sizes, split_shards
from lmpipe.data.tokens import shard_path
from lmpipe.tokenizer.model import Tokenizer

BATCH_DOCS = 1024          # documents encoded per sentencepiece call
PIECE_BYTES = 16 << 20     # text per unit of work handed to a process
POOL_MIN_BYTES = 32 << 20  # below this, starting worker processes costs more than it saves


@dataclass(frozen=True)
class _Piece:
    split: str
    shard: int              # the shard's number in its split
    part: int               # the piece's number in its shard
    source: Path
    row_groups: range
    size: int               # uncompressed bytes (for the progress bar and the order)
    target: Path            # where the piece's ids go


def encode_rows(model_proto: bytes, source: str, row_groups: range, target: str,
                threads: int = 1, batch_docs: int = BATCH_DOCS) -> dict:
    """Encode some row groups of a corpus shard to a token file; {tokens, bytes, documents}."""
    tok = Tokenizer(model_proto, num_threads=threads)
    n_tokens = n_bytes = n_docs = 0
    with open(target, "wb") as f:
        for docs in iter_text_batches(source, batch_docs, row_groups=row_groups):
            ids = tok.encode_documents(docs, num_threads=threads)
            ids.tofile(f)
            n_tokens += int(ids.size)
            n_docs += len(docs)
            n_bytes += sum(len(d.encode("utf-8")) for d in docs)
    return {"tokens": n_tokens, "bytes": n_bytes, "documents": n_docs}


def _pieces(corpus: dict[str, Path], out: Path) -> list[_Piece]:
    pieces = []
    for split, folder in corpus.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        for i, source in enumerate(split_shards(folder)):
            sizes = row_group_sizes(source) or [0]
            start, part, acc = 0, 0, 0
            for g, size in enumerate(sizes):
                acc += size
                if acc >= PIECE_BYTES or g == len(sizes) - 1:
                    target = out / f"{shard_path(split, i)}.{part}"
                    pieces.append(_Piece(split, i, part, source, range(start, g + 1), acc, target))
                    start, part, acc = g + 1, part + 1, 0
    return pieces


def encode_corpus(tok: Tokenizer, corpus: dict[str, Path], out: Path, workers: int
                  ) -> dict[str, list[dict]]:
    """Every shard of every split of `corpus` ({split: folder}) into `out`; returns, per
    split, each shard's {file, tokens, bytes, documents} in order (for meta.json)."""
    pieces = sorted(_pieces(corpus, out), key=lambda p: -p.size)
    total = sum(p.size for p in pieces)
    results: dict[_Piece, dict] = {}
    with Progress("tokenizer: encode", total=total) as bar:
        if workers <= 1 or len(pieces) == 1 or total < POOL_MIN_BYTES:
            for p in pieces:  # here: sentencepiece's threads, over the lines of a batch
                results[p] = encode_rows(tok.model_proto, str(p.source), p.row_groups,
                                         str(p.target), threads=workers)
                bar.update(p.size)
        else:
            # spawn, not fork: the parent holds pyarrow's and sentencepiece's thread pools
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(min(workers, len(pieces)), mp_context=ctx) as pool:
                futures = {pool.submit(encode_rows, tok.model_proto, str(p.source), p.row_groups,
                                       str(p.target)): p for p in pieces}
                try:
                    for future in as_completed(futures):
                        results[futures[future]] = future.result()
                        bar.update(futures[future].size)
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)  # a bad shard: stop the rest
                    raise
    return _join(pieces, results, corpus, out)


def _join(pieces: list[_Piece], results: dict[_Piece, dict], corpus: dict[str, Path],
          out: Path) -> dict[str, list[dict]]:
    """Each shard's pieces, in order, into its token file; the shards' counts per split."""
    by_shard: dict[tuple[str, int], list[_Piece]] = {}
    for p in pieces:
        by_shard.setdefault((p.split, p.shard), []).append(p)
    out_splits: dict[str, list[dict]] = {s: [] for s in corpus}
    order = list(corpus)
    for (split, shard), parts in sorted(by_shard.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
        parts.sort(key=lambda p: p.part)
        rel = shard_path(split, shard)
        if len(parts) == 1:
            os.replace(parts[0].target, out / rel)
        else:
            with open(out / rel, "wb") as f:
                for p in parts:
                    with open(p.target, "rb") as src:
                        shutil.copyfileobj(src, f, 16 << 20)
                    p.target.unlink()
        counts = {k: sum(results[p][k] for p in parts) for k in ("tokens", "bytes", "documents")}
        out_splits[split].append({"file": rel, **counts})
    return out_splits

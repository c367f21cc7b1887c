"""Encoding the corpus into token shards, in parallel over shards.

Each corpus shard (data/corpus/<split>/part-NNNNN.parquet) becomes one token shard
(data/tokens/<split>/part-NNNNN.bin, lmpipe/data/tokens.py). The shards are encoded by
`workers` processes, each running sentencepiece on one thread: the Python work around the
library (reading Parquet into strings, flattening the ids into an array, writing it) then
runs in parallel too, which sentencepiece's own threads cannot give, and a worker holds one
batch of documents at a time, so memory does not grow with the corpus. The largest shards
are handed out first. A small corpus (under POOL_MIN_BYTES of Parquet) is encoded in this
process with sentencepiece's threads instead. The ids are the same either way (a document
encodes to the same ids whole or line by line), so the files are byte-identical whatever
the number of workers (tested).
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from lmpipe.core.console import Progress
from lmpipe.data.corpus import iter_text_batches, split_shards
from lmpipe.data.tokens import shard_path
from lmpipe.tokenizer.model import Tokenizer

BATCH_DOCS = 1024   # documents encoded per sentencepiece call
POOL_MIN_BYTES = 32 << 20  # below this, starting worker processes costs more than it saves


@dataclass(frozen=True)
class _Job:
    split: str
    index: int
    source: Path
    target: Path
    rel: str     # the token shard's path relative to the tokens folder


def encode_shard(model_proto: bytes, source: str, target: str, threads: int = 1,
                 batch_docs: int = BATCH_DOCS) -> dict:
    """Encode one corpus shard to one token file; returns {tokens, bytes, documents}."""
    tok = Tokenizer(model_proto, num_threads=threads)
    n_tokens = n_bytes = n_docs = 0
    with open(target, "wb") as f:
        for docs in iter_text_batches(source, batch_docs):
            ids = tok.encode_documents(docs, num_threads=threads)
            ids.tofile(f)
            n_tokens += int(ids.size)
            n_docs += len(docs)
            n_bytes += sum(len(d.encode("utf-8")) for d in docs)
    return {"tokens": n_tokens, "bytes": n_bytes, "documents": n_docs}


def encode_corpus(tok: Tokenizer, corpus: dict[str, Path], out: Path, workers: int
                  ) -> dict[str, list[dict]]:
    """Every shard of every split of `corpus` ({split: folder}) into `out`; returns, per
    split, each shard's {file, tokens, bytes, documents} in order (for meta.json)."""
    jobs = []
    for split, folder in corpus.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        for i, source in enumerate(split_shards(folder)):
            rel = shard_path(split, i)
            jobs.append(_Job(split, i, source, out / rel, rel))
    jobs.sort(key=lambda j: -j.source.stat().st_size)  # largest first: the pool ends together
    results: dict[_Job, dict] = {}
    total = sum(j.source.stat().st_size for j in jobs)
    with Progress("tokenizer: encode (Parquet bytes)", total=total) as bar:
        if workers <= 1 or len(jobs) == 1 or total < POOL_MIN_BYTES:
            for job in jobs:  # here: sentencepiece's threads, over the lines of a batch
                results[job] = encode_shard(tok.model_proto, str(job.source), str(job.target),
                                            threads=workers)
                bar.update(job.source.stat().st_size)
        else:
            # spawn, not fork: the parent holds pyarrow's and sentencepiece's thread pools
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
                futures = {pool.submit(encode_shard, tok.model_proto, str(j.source), str(j.target)): j
                           for j in jobs}
                try:
                    for future in as_completed(futures):
                        job = futures[future]
                        results[job] = future.result()
                        bar.update(job.source.stat().st_size)
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)  # a bad shard: stop the rest
                    raise
    out_splits: dict[str, list[dict]] = {s: [] for s in corpus}
    for job in sorted(jobs, key=lambda j: (list(corpus).index(j.split), j.index)):
        out_splits[job.split].append({"file": job.rel, **results[job]})
    return out_splits

"""Stage `download`: the corpus and the instruction data -> data/corpus/, data/instruct/.

    python -m stages.download     (dvc repro download)

Reads  params `download`, `seed` (the instruction split), `data.mirror` / LMPIPE_MIRROR.
Writes data/corpus/{train,val,test}/part-NNNNN.parquet + source.json (contiguous splits of
       the documents, cut at line boundaries, in shards of `download.shard_bytes`),
       data/instruct/{train,val}.parquet + source.json, metrics/download.json; logs params,
       metrics and every split as an MLflow dataset.

The corpus streams through: documents are written into shards as they are read and never
held all at once (lmpipe/data/splits.py), so memory stays flat whatever the corpus size.
Every raw file's sha256 is checked before use and text is decoded strictly; both folders are
built beside their targets and renamed into place only when everything succeeded, so a failed
or killed run leaves the previous outputs as they were.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from lmpipe.core.console import Progress, peak_rss_mb
from lmpipe.core.errors import InputError
from lmpipe.core.files import atomic_dir, md5_file
from lmpipe.core.metric_logger import pandas_dataset, stage_logger
from lmpipe.core.names import INSTRUCT_SPLITS, SOURCE_FILE, SPLITS
from lmpipe.core.params import Params
from lmpipe.core.paths import corpus_dir, instruct_dir, project_root, scratch_dir
from lmpipe.core.records import write_metrics
from lmpipe.core.stage import main_for
from lmpipe.data.corpus import preview, split_digest, split_shards, write_columns
from lmpipe.data.fetch import mirror_dir, say
from lmpipe.data.instruct import split_records
from lmpipe.data.sources import load_instruct, open_corpus
from lmpipe.data.splits import discard, publish_splits, spool

NAME = "download"


def run(params: Params) -> None:
    dl = params.download
    mirror = mirror_dir(params.data.mirror)
    if mirror is not None:
        say(f"offline mirror: {mirror}")
    fractions = (dl.split.train, dl.split.val, dl.split.test)
    with stage_logger(NAME, params.tracking.experiment) as log:
        log.log_params({NAME: dl.model_dump(mode="json"), "seed": params.seed})
        scratch_dir().mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="download-", dir=scratch_dir()) as tmp, \
                atomic_dir(corpus_dir()) as c_tmp, atomic_dir(instruct_dir()) as i_tmp:
            # 1. The instruction data: small, read whole, split by record.
            instruct = load_instruct(dl.instruct, dl, mirror, Path(tmp))
            rows = dict(zip(INSTRUCT_SPLITS, split_records(
                instruct.items, dl.instruct.val_fraction, params.seed, dl.instruct.max_rows)))

            # 2. The corpus, streamed: every raw file verified, documents written into shards
            #    as they are read, then cut into contiguous train/val/test at line boundaries.
            t0 = time.perf_counter()
            corpus = open_corpus(dl, mirror, Path(tmp))
            with Progress("download: corpus", total=dl.max_bytes or _text_size(corpus)) as bar:
                spooled = spool(corpus.documents(), c_tmp / ".spool", dl.shard_bytes,
                                dl.max_bytes, progress=bar.update)
            if spooled.bytes == 0:
                names = ", ".join(i["name"] for i in corpus.inputs)
                raise InputError(f"the corpus is empty: {names} hold(s) no text")
            stats = publish_splits(spooled, c_tmp, fractions)
            discard(c_tmp / ".spool")
            corpus_seconds = time.perf_counter() - t0

            # 3. Describe both folders; they are swapped into place when this block ends.
            source = {"source": dl.source, **corpus.info, "inputs": corpus.inputs,
                      "sha256": corpus.sha256, "bytes": corpus.bytes, "encoding": dl.encoding,
                      "documents": spooled.documents_read, "shard_bytes": dl.shard_bytes,
                      "splits": {s: {**vars(stats[s]), "shards": len(split_shards(c_tmp / s))}
                                 for s in SPLITS}}
            instruct_source = {"format": dl.instruct.format, **instruct.info,
                               "inputs": instruct.inputs, "sha256": instruct.sha256,
                               "bytes": instruct.bytes, "seed": params.seed,
                               "val_fraction": dl.instruct.val_fraction,
                               "rows": {s: len(rows[s]) for s in INSTRUCT_SPLITS}}
            for s in INSTRUCT_SPLITS:
                write_columns(i_tmp / f"{s}.parquet", {"prompt": [p for p, _ in rows[s]],
                                                       "response": [r for _, r in rows[s]]})
            _write_json(c_tmp / SOURCE_FILE, source)
            _write_json(i_tmp / SOURCE_FILE, instruct_source)
        say("published data/corpus ("
            + ", ".join(f"{s} {stats[s].bytes:,} B / {stats[s].lines:,} lines / "
                        f"{source['splits'][s]['shards']} shard(s)" for s in SPLITS)
            + f") and data/instruct (train {len(rows['train']):,} / val {len(rows['val']):,} rows)")

        # 4. Metrics and tracking.
        metrics = {"source": dl.source, "sha256": corpus.sha256, "raw_bytes": corpus.bytes,
                   "documents": spooled.documents_read, "instruct_sha256": instruct.sha256,
                   "corpus_seconds": round(corpus_seconds, 3), "peak_rss_mb": peak_rss_mb()}
        for s in SPLITS:
            metrics.update({f"{s}_bytes": stats[s].bytes, f"{s}_lines": stats[s].lines,
                            f"{s}_documents": stats[s].documents})
        metrics.update({f"instruct_{s}_rows": len(rows[s]) for s in INSTRUCT_SPLITS})
        metrics = write_metrics(NAME, metrics)
        log.log_metrics(metrics)
        log.set_tags({"download.source": dl.source, "download.sha256": corpus.sha256,
                      "download.instruct_sha256": instruct.sha256})
        if log.run_id:
            _log_splits(log)


def _text_size(corpus) -> int | None:
    """About the bytes of text to read, for the progress bar's ETA: the inputs' size when
    they are plain text files; unknown (None) for Parquet, archives or a Hub dataset."""
    plain = all(i["name"].lower().endswith((".txt", ".jsonl")) for i in corpus.inputs)
    return (corpus.bytes or None) if plain else None


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _log_splits(log) -> None:
    """Each published split as an MLflow dataset input: a corpus split by its first rows (a
    split may hold gigabytes) and the md5 of its shards, an instruction split whole with its
    file's DVC md5."""
    for split in SPLITS:
        folder = corpus_dir() / split
        ds = pandas_dataset(preview(folder), name=f"corpus-{split}", digest=split_digest(folder),
                            source=folder.relative_to(project_root()).as_posix())
        if ds is not None:
            log.log_input(ds, context=split)
    for split in INSTRUCT_SPLITS:
        path = instruct_dir() / f"{split}.parquet"
        ds = pandas_dataset(pq.read_table(path).to_pandas(), name=f"instruct-{split}",
                            digest=md5_file(path), source=path.relative_to(project_root()).as_posix())
        if ds is not None:
            log.log_input(ds, context=f"instruct-{split}")


if __name__ == "__main__":
    main_for(NAME, run)

"""Stage `download`: the corpus and the instruction data -> data/corpus/, data/instruct/.

    python -m stages.download     (dvc repro download)

Reads  params `download`, `seed` (the instruction split), `data.mirror` / LMPIPE_MIRROR.
Writes data/corpus/{train,val,test}.parquet + source.json (contiguous splits of the
       documents, cut at line boundaries), data/instruct/{train,val}.parquet + source.json,
       metrics/download.json; logs params, metrics and every split as an MLflow dataset.

Every raw file's sha256 is checked before use and text is decoded strictly; both folders are
built beside their targets and renamed into place only when everything succeeded, so a failed
or killed run leaves the previous outputs as they were.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

from lmpipe.core.errors import InputError
from lmpipe.core.files import atomic_dir, md5_file
from lmpipe.core.metric_logger import pandas_dataset, stage_logger
from lmpipe.core.names import INSTRUCT_SPLITS, SOURCE_FILE, SPLITS
from lmpipe.core.params import Params
from lmpipe.core.paths import corpus_dir, instruct_dir, project_root, scratch_dir
from lmpipe.core.records import write_metrics
from lmpipe.core.stage import main_for
from lmpipe.data.corpus import write_columns
from lmpipe.data.fetch import mirror_dir, say
from lmpipe.data.instruct import split_records
from lmpipe.data.sources import load_corpus, load_instruct
from lmpipe.data.text import split_documents, split_stats, truncate_documents

NAME = "download"


def run(params: Params) -> None:
    dl = params.download
    mirror = mirror_dir(params.data.mirror)
    if mirror is not None:
        say(f"offline mirror: {mirror}")
    with stage_logger(NAME, params.tracking.experiment) as log:
        log.log_params({NAME: dl.model_dump(mode="json"), "seed": params.seed})

        # 1. Read and verify every raw file (archives are extracted into a scratch folder).
        scratch_dir().mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="download-", dir=scratch_dir()) as tmp:
            corpus = load_corpus(dl, mirror, Path(tmp))
            instruct = load_instruct(dl.instruct, dl, mirror, Path(tmp))
        if not corpus.items:
            names = ", ".join(i["name"] for i in corpus.inputs)
            raise InputError(f"the corpus is empty: {names} hold(s) no text")

        # 2. Split: the corpus into contiguous train/val/test, the instructions by record.
        docs = corpus.items if dl.max_bytes is None else truncate_documents(corpus.items, dl.max_bytes)
        splits = split_documents(docs, (dl.split.train, dl.split.val, dl.split.test))
        stats = {s: split_stats(splits[s]) for s in SPLITS}
        rows = dict(zip(INSTRUCT_SPLITS, split_records(
            instruct.items, dl.instruct.val_fraction, params.seed, dl.instruct.max_rows)))

        # 3. Publish both folders, each atomically.
        source = {"source": dl.source, **corpus.info, "inputs": corpus.inputs,
                  "sha256": corpus.sha256, "bytes": corpus.bytes, "encoding": dl.encoding,
                  "documents": len(corpus.items), "splits": {s: vars(stats[s]) for s in SPLITS}}
        instruct_source = {"format": dl.instruct.format, **instruct.info,
                           "inputs": instruct.inputs, "sha256": instruct.sha256,
                           "bytes": instruct.bytes, "seed": params.seed,
                           "val_fraction": dl.instruct.val_fraction,
                           "rows": {s: len(rows[s]) for s in INSTRUCT_SPLITS}}
        with atomic_dir(corpus_dir()) as c_tmp, atomic_dir(instruct_dir()) as i_tmp:
            for s in SPLITS:
                write_columns(c_tmp / f"{s}.parquet", {"text": splits[s]})
            for s in INSTRUCT_SPLITS:
                write_columns(i_tmp / f"{s}.parquet", {"prompt": [p for p, _ in rows[s]],
                                                       "response": [r for _, r in rows[s]]})
            _write_json(c_tmp / SOURCE_FILE, source)
            _write_json(i_tmp / SOURCE_FILE, instruct_source)
        say("published data/corpus ("
            + ", ".join(f"{s} {stats[s].bytes:,} B / {stats[s].lines:,} lines" for s in SPLITS)
            + f") and data/instruct (train {len(rows['train']):,} / val {len(rows['val']):,} rows)")

        # 4. Metrics and tracking.
        metrics = {"source": dl.source, "sha256": corpus.sha256, "raw_bytes": corpus.bytes,
                   "documents": len(corpus.items), "instruct_sha256": instruct.sha256}
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


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _log_splits(log) -> None:
    """Each published split as an MLflow dataset input, its digest the file's DVC md5."""
    for kind, folder, splits in (("corpus", corpus_dir(), SPLITS),
                                 ("instruct", instruct_dir(), INSTRUCT_SPLITS)):
        for split in splits:
            path = folder / f"{split}.parquet"
            ds = pandas_dataset(pq.read_table(path).to_pandas(), name=f"{kind}-{split}",
                                digest=md5_file(path),
                                source=path.relative_to(project_root()).as_posix())
            if ds is not None:
                log.log_input(ds, context=split if kind == "corpus" else f"instruct-{split}")


if __name__ == "__main__":
    main_for(NAME, run)

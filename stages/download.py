"""DVC stage `download`: corpus and instruction data -> data/corpus/, data/instruct/.

    python -m stages.download     (dvc repro download)

Reads the `download` and `seed` params; writes data/corpus/{train,val,test}.parquet +
source.json, data/instruct/{train,val}.parquet + source.json, and metrics/download.json.
Set LMPIPE_MIRROR to a folder holding the raw files to run offline.
"""

from __future__ import annotations

from lmpipe import download
from lmpipe.config import Params
from lmpipe.metrics import write_metrics
from lmpipe.paths import project_root
from lmpipe.stage import main_for
from lmpipe.tracking import pandas_dataset, stage_logger


def _log_splits(log, result: download.DownloadResult) -> None:
    """Each published split as an MLflow dataset input, its digest the file's DVC md5."""
    import pyarrow.parquet as pq

    for kind, paths in (("corpus", result.corpus), ("instruct", result.instruct)):
        for split, path in paths.items():
            df = pq.read_table(path).to_pandas()
            rel = path.relative_to(project_root()).as_posix()
            ds = pandas_dataset(df, name=f"{kind}-{split}", digest=download.split_digest(path),
                                source=rel)
            if ds is not None:
                log.log_input(ds, context=split if kind == "corpus" else f"instruct-{split}")


def run(params: Params) -> None:
    with stage_logger("download", params.tracking.experiment) as log:
        log.log_params({"download": params.download.model_dump(mode="json"), "seed": params.seed})
        result = download.run(params)
        metrics = write_metrics("download", result.metrics)
        log.log_metrics(metrics)
        log.set_tags({"download.source": metrics["source"], "download.sha256": metrics["sha256"],
                      "download.instruct_sha256": metrics["instruct_sha256"]})
        if log.run_id:
            _log_splits(log, result)


if __name__ == "__main__":
    main_for("download", run)

"""Stage `tokenizer`: train the BPE model on the train split, encode every split.

Reads  data/corpus/{train,val,test}.parquet and params `tokenizer`.
Writes data/tokenizer/tokenizer.model (+ tokenizer.vocab), data/tokens/{train,val,test}.bin,
       data/tokens/meta.json, metrics/tokenizer.json; logs params, metrics and the model to
       MLflow. Run it with `dvc repro tokenizer` (or `python -m stages.tokenizer`).
"""

from __future__ import annotations

from lmpipe import paths
from lmpipe.config import Params
from lmpipe.errors import InputError
from lmpipe.metrics import write_metrics
from lmpipe.stage import main_for
from lmpipe.tokenizer import META_FILE, MODEL_FILE, SPLITS, VOCAB_FILE, build
from lmpipe.tracking import stage_logger

NAME = "tokenizer"


def run(params: Params) -> None:
    p = params.tokenizer
    corpus = paths.corpus_dir()
    missing = [f"{s}.parquet" for s in SPLITS if not (corpus / f"{s}.parquet").exists()]
    if missing:
        raise InputError(
            f"{corpus}: missing {', '.join(missing)}; run the download stage first (`dvc repro download`)"
        )
    with stage_logger(NAME, params.tracking.experiment) as log:
        log.log_params({NAME: p.model_dump(mode="json")})
        result = build(
            corpus,
            paths.tokenizer_dir(),
            paths.tokens_dir(),
            vocab_size=p.vocab_size,
            num_threads=p.num_threads,
            character_coverage=p.character_coverage,
            max_sentence_length=p.max_sentence_length,
            input_sentence_size=p.input_sentence_size,
        )
        metrics = write_metrics(NAME, result["metrics"])
        log.log_metrics(metrics)
        log.log_artifact(paths.tokenizer_dir() / MODEL_FILE, "tokenizer")
        log.log_artifact(paths.tokenizer_dir() / VOCAB_FILE, "tokenizer")
        log.log_artifact(paths.tokens_dir() / META_FILE, "tokens")
    splits = result["meta"]["splits"]
    print(
        f"tokenizer: vocab {metrics['vocab_size']}, trained in {metrics['train_seconds']:.2f}s, "
        f"encoded in {metrics['encode_seconds']:.2f}s; "
        + ", ".join(f"{s} {splits[s]['tokens']} tokens" for s in SPLITS)
        + f"; val {metrics['val_bytes_per_token']:.3f} bytes/token"
    )


if __name__ == "__main__":
    main_for(NAME, run)

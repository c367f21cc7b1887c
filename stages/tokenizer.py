"""Stage `tokenizer`: train the BPE model on the train split, encode every split to token ids.

    python -m stages.tokenizer     (dvc repro tokenizer)

Reads  data/corpus/{train,val,test}.parquet and params `tokenizer`.
Writes data/tokenizer/tokenizer.model (+ tokenizer.vocab), data/tokens/{train,val,test}.bin +
       meta.json (lmpipe/data/tokens.py), metrics/tokenizer.json; logs params, metrics and
       the model to MLflow.

Both folders are built beside their targets and renamed into place only when everything
succeeded. The model is byte-identical for the same corpus and params on any machine.
"""

from __future__ import annotations

import time

from lmpipe.core.errors import InputError
from lmpipe.core.files import atomic_dir, sha256_file
from lmpipe.core.metric_logger import stage_logger
from lmpipe.core.names import (
    SPLITS,
    TOKENIZER_FILE,
    TOKENIZER_VOCAB_FILE,
    TOKENS_META_FILE,
)
from lmpipe.core.params import Params
from lmpipe.core.paths import corpus_dir, tokenizer_dir, tokens_dir
from lmpipe.core.records import write_metrics
from lmpipe.core.stage import main_for
from lmpipe.data.tokens import encode_split, write_tokens_meta
from lmpipe.tokenizer.model import save_tokenizer
from lmpipe.tokenizer.training import train_tokenizer

NAME = "tokenizer"


def run(params: Params) -> None:
    p = params.tokenizer
    corpus = {s: corpus_dir() / f"{s}.parquet" for s in SPLITS}
    missing = [str(f) for f in corpus.values() if not f.exists()]
    if missing:
        raise InputError(f"corpus split(s) not found: {', '.join(missing)}; run the download "
                         "stage first (`dvc repro download`)")
    with stage_logger(NAME, params.tracking.experiment) as log:
        log.log_params({NAME: p.model_dump(mode="json")})
        with atomic_dir(tokenizer_dir()) as tok_tmp, atomic_dir(tokens_dir()) as ids_tmp:
            t0 = time.perf_counter()
            tok = train_tokenizer(corpus["train"], p.vocab_size, p.num_threads,
                                  character_coverage=p.character_coverage,
                                  max_sentence_length=p.max_sentence_length,
                                  input_sentence_size=p.input_sentence_size)
            train_seconds = time.perf_counter() - t0
            save_tokenizer(tok, tok_tmp / TOKENIZER_FILE)

            t0 = time.perf_counter()
            splits = {s: encode_split(tok, corpus[s], ids_tmp / f"{s}.bin", p.num_threads)
                      for s in SPLITS}
            encode_seconds = time.perf_counter() - t0
            write_tokens_meta(ids_tmp, tok, splits, sha256_file(tok_tmp / TOKENIZER_FILE))

        def bytes_per_token(s: str) -> float:
            return round(splits[s]["bytes"] / splits[s]["tokens"], 6) if splits[s]["tokens"] else 0.0

        metrics = write_metrics(NAME, {
            "vocab_size": tok.vocab_size,
            "train_seconds": round(train_seconds, 3),
            "encode_seconds": round(encode_seconds, 3),
            "val_bytes_per_token": bytes_per_token("val"),
            "test_bytes_per_token": bytes_per_token("test"),
            **{f"{s}_tokens": splits[s]["tokens"] for s in SPLITS},
        })
        log.log_metrics(metrics)
        log.log_artifact(tokenizer_dir() / TOKENIZER_FILE, "tokenizer")
        log.log_artifact(tokenizer_dir() / TOKENIZER_VOCAB_FILE, "tokenizer")
        log.log_artifact(tokens_dir() / TOKENS_META_FILE, "tokens")
    print(f"tokenizer: vocab {tok.vocab_size}, trained in {train_seconds:.2f}s, encoded in "
          f"{encode_seconds:.2f}s; " + ", ".join(f"{s} {splits[s]['tokens']} tokens" for s in SPLITS)
          + f"; val {metrics['val_bytes_per_token']:.3f} bytes/token")


if __name__ == "__main__":
    main_for(NAME, run)

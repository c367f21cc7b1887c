"""Stage `ngram`: the count-based baseline (interpolated modified Kneser-Ney, or add-k).

Reads  data/tokens/{train,val,test}/ + meta.json (the tokenizer stage's id streams, so the
       model is scored on exactly the tokens the neural models see), data/tokenizer (for the
       sample text) and params `ngram`, `seed`.
Writes data/models/ngram/model.npz (compact binary model), data/models/ngram/model.arpa.gz
       (ARPA for KenLM/SRILM; Kneser-Ney only), metrics/ngram.json; logs params, metrics,
       both files and a sample to MLflow. Run it with `dvc repro ngram` (or
       `python -m stages.ngram`).

Within `ngram.memory_gb` the model is estimated in memory (lmpipe/ngram/estimate.py); when
that could need more, counts spill to disk as sorted runs (lmpipe/ngram/external.py) and the
model's levels come back memory-mapped: the probabilities are the same, only memory differs.
Scoring reads the model memory-mapped either way (only the pages its lookups touch).
"""

from __future__ import annotations

import time

from lmpipe.core.console import current_rss_mb, note, peak_rss_mb
from lmpipe.core.errors import InputError
from lmpipe.core.metric_logger import stage_logger
from lmpipe.core.names import ARPA_FILE, NGRAM_FILE, TOKENIZER_FILE
from lmpipe.core.params import NgramParams, Params
from lmpipe.core.paths import model_dir, scratch_dir, tokenizer_dir
from lmpipe.core.records import write_metrics
from lmpipe.core.stage import main_for
from lmpipe.data.tokens import load_tokens, tokens_meta
from lmpipe.evaluation.metrics import bits_per_byte, perplexity
from lmpipe.ngram.estimate import estimate
from lmpipe.ngram.external import estimate_on_disk, in_memory_fits
from lmpipe.ngram.model import NgramModel
from lmpipe.ngram.sampling import generate_text
from lmpipe.ngram.store import save_ngram

NAME = "ngram"
SPILLED_SCORE_CHUNK = 1 << 20  # tokens per scoring window beside a model counted on disk


def _estimate(p: NgramParams, train, meta: dict) -> tuple[NgramModel, bool]:
    """The model, and whether it was counted on disk: in memory when that surely fits in
    `ngram.memory_gb` (less what the stage already holds), else on disk."""
    vocab, eos = int(meta["vocab_size"]), int(meta["eos_id"])
    budget = int(p.memory_gb * 2**30 - current_rss_mb() * 2**20)
    common = dict(order=p.order, method=p.method, k=p.k, unk_id=meta.get("unk_id"),
                  bos_id=meta.get("bos_id"))
    if in_memory_fits(len(train), vocab, p.order, budget):
        return estimate(train, vocab, eos, chunk_tokens=p.chunk_tokens, threads=p.threads,
                        **common), False
    note(f"ngram: order {p.order} on {len(train):,} tokens may not fit in "
         f"ngram.memory_gb={p.memory_gb:g}: counting on disk (sorted runs)")
    return estimate_on_disk(train, vocab, eos, memory_bytes=max(budget, 16 << 20),
                            work_dir=scratch_dir(), threads=p.threads, **common), True


def run(params: Params) -> None:
    p = params.ngram
    meta = tokens_meta()
    for split in ("train", "val", "test"):
        if split not in meta.get("splits", {}):
            raise InputError(f"data/tokens/meta.json: no {split!r} split; rerun `dvc repro tokenizer`")
    vocab, eos = int(meta["vocab_size"]), int(meta["eos_id"])
    out_dir = model_dir(NAME)

    with stage_logger(NAME, params.tracking.experiment) as log:
        log.log_params({NAME: p.model_dump(mode="json"), "seed": params.seed})
        train = load_tokens("train")
        t0, cpu0 = time.perf_counter(), time.process_time()
        model, on_disk = _estimate(p, train, meta)
        train_seconds, train_cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
        estimate_peak_mb = peak_rss_mb()

        arpa_seconds = save_ngram(model, out_dir, arpa=p.arpa)

        metrics: dict[str, float | int] = {}
        score_seconds, score_tokens = 0.0, 0
        # a model counted on disk is large and memory-mapped: its pages count as resident once
        # read, so the scoring windows (and their temporaries) are kept small beside it
        score_chunk = min(p.chunk_tokens, SPILLED_SCORE_CHUNK) if on_disk else p.chunk_tokens
        for split in ("val", "test"):
            ids = load_tokens(split)
            if ids.shape[0] == 0:
                raise InputError(f"data/tokens/{split}: empty, nothing to score")
            t0 = time.perf_counter()
            nll, n = model.score(ids, chunk_tokens=score_chunk, threads=p.threads)
            score_seconds += time.perf_counter() - t0
            score_tokens += n
            metrics[f"{split}_loss"] = nll / n
            metrics[f"{split}_ppl"] = perplexity(nll, n)
            metrics[f"{split}_bpb"] = bits_per_byte(nll, int(meta["splits"][split]["bytes"]))
        n_train = int(train.shape[0])
        metrics.update(
            {
                "train_tokens": n_train,
                "train_seconds": train_seconds,
                "train_cpu_seconds": train_cpu_seconds,  # all threads: a load-independent rate
                "tokens_per_second": n_train / train_seconds if train_seconds > 0 else 0.0,
                "score_tokens_per_second": score_tokens / score_seconds if score_seconds > 0 else 0.0,
                "arpa_seconds": arpa_seconds,
                "model_bytes": (out_dir / NGRAM_FILE).stat().st_size,
                "estimated_on_disk": int(on_disk),
                "estimate_peak_rss_mb": estimate_peak_mb,
                "peak_rss_mb": peak_rss_mb(),
            }
        )
        if (out_dir / ARPA_FILE).exists():
            metrics["arpa_bytes"] = (out_dir / ARPA_FILE).stat().st_size
        for n, count in enumerate(model.meta["ngrams_per_order"], start=1):
            metrics[f"ngrams_order_{n}"] = count
        metrics = write_metrics(NAME, metrics)
        log.log_metrics(metrics)
        log.set_tags({"ngram.discount_fallback": str(model.meta.get("discount_fallback", []))})
        for name in (NGRAM_FILE, ARPA_FILE):
            if (out_dir / name).exists():
                log.log_artifact(out_dir / name, "model")
        sample = ""
        if p.sample_tokens and (tokenizer_dir() / TOKENIZER_FILE).exists():
            sample = generate_text(
                out_dir, "", p.sample_tokens, temperature=p.temperature, top_k=p.top_k, seed=params.seed
            )
            log.log_text(sample, "sample.txt")

    print(
        f"ngram: order {p.order} {p.method}, {n_train} train tokens in {train_seconds:.2f}s "
        f"({metrics['tokens_per_second'] / 1e6:.2f}M tok/s); val ppl {metrics['val_ppl']:.2f} "
        f"({metrics['val_bpb']:.3f} bpb), test ppl {metrics['test_ppl']:.2f} "
        f"({metrics['test_bpb']:.3f} bpb); n-grams per order {model.meta['ngrams_per_order']}"
    )
    if sample:
        print("ngram: sample: " + sample[:200].replace("\n", "\\n"))


if __name__ == "__main__":
    main_for(NAME, run)

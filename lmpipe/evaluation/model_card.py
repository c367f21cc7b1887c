"""One plain sentence per model: what it is, what it read, how long it trained.

People meet these models through `lmpipe chat`, `lmpipe generate` and the report card; the
numbers alone (perplexity 99) do not say that the SFT model is a few-million-parameter toy
finetuned for a minute on a few hundred instructions, so its answers are fluent-looking
fragments rather than correct ones. The sentence is built from the metrics files the stages
wrote, so it describes the run that produced the weights being used.
"""

from __future__ import annotations

from pathlib import Path

from lmpipe.core.names import MODEL_STAGE
from lmpipe.core.records import read_stage_metrics

KIND = {"ngram": "Kneser-Ney n-gram model", "rnn": "recurrent network (RNN)",
        "transformer": "Transformer", "sft": "Transformer", "lora": "Transformer"}


def _size(n: float | None) -> str:
    if not n:
        return "a"
    return f"a {n / 1e6:.1f} M-parameter" if n >= 1e6 else f"a {n / 1e3:.0f} k-parameter"


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return "an unknown time"
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} minutes"


def describe_model(model: str, root: Path | None = None) -> str:
    """`sft: a 3.5 M-parameter Transformer, pretrained for 5.0 minutes on 1,003,854 bytes of
    text, then finetuned for 40 s on 190 instruction examples. A small demonstration model: ...`"""
    m = read_stage_metrics(MODEL_STAGE[model], root)
    corpus = read_stage_metrics("download", root)
    data = f"{corpus['train_bytes']:,} bytes of text" if corpus.get("train_bytes") else "the corpus"
    if model == "ngram":
        orders = sorted(int(k.rsplit("_", 1)[1]) for k in m if k.startswith("ngrams_order_"))
        n = sum(m[f"ngrams_order_{o}"] for o in orders)
        size = (f"an order-{orders[-1] if orders else '?'} {KIND[model]}"
                + (f" ({n:,} n-grams)" if n else ""))
        what = f"{size}, counted in {_minutes(m.get('train_seconds'))} from {data}"
    elif model in ("sft", "lora"):
        base = read_stage_metrics("pretrain", root)
        how = ("LoRA adapters " + f"({m.get('trainable_pct', 0):.1f}% of the weights) "
               if model == "lora" else "all weights ")
        what = (f"{_size(m.get('params'))} {KIND[model]}, pretrained for "
                f"{_minutes(base.get('train_seconds'))} on {data}, then {how}finetuned for "
                f"{_minutes(m.get('train_seconds'))} on {m.get('train_examples', '?')} "
                "instruction examples")
    else:
        what = (f"{_size(m.get('params'))} {KIND[model]} trained for "
                f"{_minutes(m.get('train_seconds'))} on {data}")
    return (f"{model}: {what}. A small demonstration model: expect text in the style of its "
            "data, not facts or correct answers.")

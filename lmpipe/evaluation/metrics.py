"""The numbers every model is judged by, defined once: perplexity, bits per byte, and the
course's order of the model family on them."""

from __future__ import annotations

import math
from typing import Any, Mapping


def perplexity(total_nll_nats: float, n_tokens: int) -> float:
    """exp(mean negative log-likelihood per token)."""
    if n_tokens <= 0:
        raise ValueError("perplexity needs at least one token")
    return math.exp(total_nll_nats / n_tokens)


def bits_per_byte(total_nll_nats: float, n_bytes: int) -> float:
    """Total NLL in bits divided by the UTF-8 bytes of the scored text.

    Unlike perplexity it does not depend on the tokenizer, so models with different
    vocabularies (or a character model) can be compared on the same text.
    """
    if n_bytes <= 0:
        raise ValueError("bits per byte needs at least one byte")
    return total_nll_nats / math.log(2) / n_bytes


FAMILY = ("ngram", "rnn", "transformer")   # the course's order: each should beat the one before


def family_order(results: Mapping[str, Mapping[str, Any]], split: str) -> dict[str, Any] | None:
    """Whether Transformer < RNN < n-gram in bits per byte on `split`, with each neural model's
    ratio to the n-gram; None unless all three were scored on it."""
    bpb = {m: results.get(m, {}).get(f"{split}_bpb") for m in FAMILY}
    if any(v is None for v in bpb.values()):
        return None
    return {"holds": bpb["transformer"] < bpb["rnn"] < bpb["ngram"],
            "rnn_vs_ngram": bpb["rnn"] / bpb["ngram"],
            "transformer_vs_ngram": bpb["transformer"] / bpb["ngram"]}

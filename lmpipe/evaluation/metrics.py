"""The numbers every model is judged by, defined once: perplexity and bits per byte."""

from __future__ import annotations

import math


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

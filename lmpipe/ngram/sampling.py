"""Sampling text from an n-gram model: temperature and top-k over p(w | context)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from lmpipe.core.errors import InputError
from lmpipe.core.names import TOKENIZER_FILE
from lmpipe.core.paths import tokenizer_dir as default_tokenizer_dir
from lmpipe.ngram.model import LN10, NgramModel
from lmpipe.ngram.store import load_ngram
from lmpipe.tokenizer.model import Tokenizer


def sample_next(
    log10p: np.ndarray, rng: np.random.Generator, temperature: float = 1.0, top_k: int | None = None
) -> int:
    """Draw one token id from log10 probabilities with temperature and top-k.

    temperature 0 is greedy (argmax); top_k keeps the k most probable ids.
    """
    if temperature < 0:
        raise InputError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise InputError(f"top_k must be >= 1, got {top_k}")
    if temperature == 0:
        return int(np.argmax(log10p))
    logits = log10p * (LN10 / temperature)
    if top_k is not None and top_k < logits.shape[0]:
        cut = np.partition(logits, -top_k)[-top_k]
        logits = np.where(logits >= cut, logits, -np.inf)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    return int(rng.choice(p.shape[0], p=p))


def generate_ids(
    model: NgramModel,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    stop_at_eos: bool = True,
) -> list[int]:
    """Sample up to `max_new_tokens` ids after `prompt_ids` (a document start); returns new ids."""
    rng = np.random.default_rng(seed)
    ids = [int(t) for t in prompt_ids]
    new: list[int] = []
    for _ in range(max(0, int(max_new_tokens))):
        tok = sample_next(model.next_log10_distribution(ids), rng, temperature, top_k)
        if stop_at_eos and tok == model.eos_id:
            break
        ids.append(tok)
        new.append(tok)
    return new


def generate_text(
    model_dir: str | os.PathLike,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    tokenizer_dir: str | os.PathLike | None = None,
) -> str:
    """Prompt + a continuation sampled from the model in `model_dir` (text in, text out).

    The prompt is the start of a document (context <s> + prompt tokens); sampling stops at
    EOS or after `max_new_tokens`. The tokenizer comes from data/tokenizer (or
    `tokenizer_dir`).
    """
    model = load_ngram(model_dir)
    tok = _load_tokenizer(model_dir, tokenizer_dir)
    prompt_ids = list(tok.encode(prompt)) if prompt else []
    new = generate_ids(model, prompt_ids, max_new_tokens, temperature, top_k, seed)
    return tok.decode(prompt_ids + new)


def _load_tokenizer(model_dir, tokenizer_dir) -> Tokenizer:
    candidates = [Path(tokenizer_dir)] if tokenizer_dir else []
    candidates += [default_tokenizer_dir(), Path(model_dir).resolve().parent.parent / "tokenizer"]
    for folder in candidates:
        if (folder / TOKENIZER_FILE).exists():
            return Tokenizer.load(folder / TOKENIZER_FILE)
    raise InputError(
        f"tokenizer not found (looked in {', '.join(str(c) for c in candidates)}); run `dvc repro tokenizer`"
    )

"""Scoring: the total negative log-likelihood of a token stream under any trained model.

Every model scores the same N tokens under the scoring convention of docs/ARCHITECTURE.md:
the context before the first token is a document boundary (neural models read ``[EOS] + ids``
and predict ``ids``; the n-gram model starts from ``<s>``), and EOS inside the stream is
predicted like any other token. Perplexity and bits per byte then come from
``lmpipe.evaluation.metrics`` (the one definition), so `evaluate`, `lmpipe eval` and the
training stages cannot disagree on what the numbers mean. How a neural model reads the
stream (windows, stride, carried state) is lmpipe/evaluation/neural.py.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmpipe.core.errors import InputError
from lmpipe.core.names import MODEL_CONFIG_FILE
from lmpipe.data.tokens import load_tokens, tokens_meta
from lmpipe.evaluation.metrics import bits_per_byte, perplexity
from lmpipe.evaluation.neural import score_recurrent, score_windows
from lmpipe.models.store import count_parameters, load_model
from lmpipe.ngram.store import is_ngram_folder, load_ngram
from lmpipe.tokenizer.model import Tokenizer
from lmpipe.train.runtime import cpu_supports_bf16


# ----------------------------------------------------------------------------- the result
@dataclass
class Score:
    """Total NLL (nats) of `n_tokens` predictions covering `n_bytes` UTF-8 bytes of text."""

    total_nll: float
    n_tokens: int
    n_bytes: int
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"       # the precision the model ran in (not a metric)

    @property
    def loss(self) -> float:
        """Mean NLL per token in nats (the training loss's unit)."""
        return self.total_nll / self.n_tokens

    @property
    def ppl(self) -> float:
        return perplexity(self.total_nll, self.n_tokens)

    @property
    def bpb(self) -> float:
        return bits_per_byte(self.total_nll, self.n_bytes)

    @property
    def tokens_per_second(self) -> float:
        return self.n_tokens / self.seconds if self.seconds > 0 else float("inf")

    def metrics(self, split: str = "test") -> dict[str, float | int]:
        """Flat metrics in the project's naming (split first), for metrics/*.json."""
        out = {
            f"{split}_loss": round(self.loss, 6),
            f"{split}_ppl": round(self.ppl, 6),
            f"{split}_bpb": round(self.bpb, 6),
            f"{split}_tokens": int(self.n_tokens),
            f"{split}_bytes": int(self.n_bytes),
            "tokens_per_second": round(self.tokens_per_second, 1),
            "score_seconds": round(self.seconds, 3),
        }
        out.update(self.extra)
        return out


# ----------------------------------------------------------------------------- models
@dataclass
class LoadedModel:
    """A model ready to score: the n-gram or a neural model with how it reads context."""

    kind: str                    # 'ngram', 'transformer' or 'rnn'
    model: Any
    params: int
    context_length: int | None   # None: unbounded (RNN carrying state, n-gram order is its own)
    folder: Path


def load_for_scoring(folder: str | os.PathLike, device: str = "cpu",
                     rnn_context: int | None = None) -> LoadedModel:
    """Load any trained model folder (n-gram or neural) for `score_ids`."""
    folder = Path(folder)
    if not folder.exists():
        raise InputError(f"{folder}: model folder not found")
    if not (folder / MODEL_CONFIG_FILE).exists() and is_ngram_folder(folder):
        model = load_ngram(folder)
        return LoadedModel("ngram", model, _ngram_size(model), None, folder)
    model, info = load_model(folder, device=device)
    kind = info["model_type"]
    ctx = getattr(model.config, "context_length", None) if kind == "transformer" else rnn_context
    return LoadedModel(kind, model, count_parameters(model), ctx, folder)


def _ngram_size(model) -> int:
    """Stored n-gram entries of every order: the count-based model's 'parameters'."""
    return int(sum(model.ngram_counts()))


def _vocab_size(loaded: LoadedModel) -> int:
    if loaded.kind == "ngram":
        return int(loaded.model.vocab_size)
    return int(loaded.model.config.vocab_size)


def resolve_dtype(dtype: str, device: str | torch.device) -> str:
    """'auto' -> 'bfloat16' where `device` computes bf16 natively (a CUDA GPU with bf16, a CPU
    with AVX512-BF16 or AMX), else 'float32'; other values pass through.

    Why bf16 for windowed scoring: it is forward-only matmuls, 2-2.5x faster than fp32 on
    such a CPU (benchmarks/train.py), and the bits per byte stay within 1e-3 of fp32 (the
    log-softmax and the sums run in fp32/fp64; tests/test_evaluate.py checks a trained model).
    """
    if dtype != "auto":
        return dtype
    dev = torch.device(device)
    native = torch.cuda.is_bf16_supported() if dev.type == "cuda" else cpu_supports_bf16()
    return "bfloat16" if native else "float32"


def score_ids(loaded: LoadedModel, ids: np.ndarray, n_bytes: int, *, eos_id: int,
              stride: int | None = None, batch_size: int = 8, rnn_chunk: int = 256,
              dtype: str = "float32", progress: bool = False, desc: str = "scoring",
              stride_key: str = "evaluate.stride") -> Score:
    """Score a token stream covering `n_bytes` bytes of text with a loaded model.

    A model that reads windows (a Transformer; an RNN given `rnn_context`) slides them by
    `stride`, or by half its context when `stride` is None: every token then reads at least
    C/2 tokens before it, the fair match for an RNN that reads its whole past (stride = C is
    the cheaper non-overlapping scheme, where a window's first tokens read almost nothing).

    `dtype` 'auto' (`resolve_dtype`) applies to Transformers; recurrent models score in
    float32 under 'auto' (a state carried through the stream would carry bf16 rounding from
    token to token). `Score.dtype` says which precision ran."""
    ids = np.asarray(ids)
    if ids.size == 0:
        raise InputError("nothing to score: the token stream is empty")
    vocab = _vocab_size(loaded)
    if int(ids.max()) >= vocab or eos_id >= vocab:
        raise InputError(f"{loaded.folder}: the model knows {vocab} token ids but the text has id "
                         f"{max(int(ids.max()), eos_id)}: it was trained with another tokenizer; "
                         "retrain it (`dvc repro`)")
    if loaded.kind == "transformer":
        dtype = resolve_dtype(dtype, next(loaded.model.parameters()).device)
    elif dtype == "auto":
        dtype = "float32"
    t0 = time.perf_counter()
    extra: dict[str, Any] = {"params": int(loaded.params)}
    if loaded.kind == "ngram":
        logp = np.asarray(loaded.model.logprobs(ids), dtype=np.float64)
        if logp.shape != ids.shape:
            raise RuntimeError(f"n-gram logprobs returned shape {logp.shape} for {ids.shape} ids")
        total = float(-logp.sum())
    elif loaded.context_length is None:
        total = score_recurrent(loaded.model, ids, eos_id=eos_id, chunk=rnn_chunk, dtype=dtype,
                                progress=progress, desc=desc)
        extra["context_length"] = 0   # 0 = unbounded (state carried through the stream)
    else:
        stride = stride or max(1, loaded.context_length // 2)
        total = score_windows(loaded.model, ids, loaded.context_length, eos_id=eos_id,
                              stride=stride, batch_size=batch_size, dtype=dtype,
                              progress=progress, desc=desc, stride_key=stride_key)
        extra["context_length"] = int(loaded.context_length)
        extra["stride"] = int(stride)
    seconds = time.perf_counter() - t0
    if not math.isfinite(total):
        raise RuntimeError(f"{loaded.folder}: the model gave a non-finite NLL ({total})")
    return Score(total, int(ids.size), int(n_bytes), seconds, extra, dtype)


# ----------------------------------------------------------------------------- text and bytes
def token_byte_lengths(tok) -> np.ndarray:
    """UTF-8 bytes each token id stands for (0 for control tokens such as EOS).

    Exact because the tokenizer round-trips text (no normalisation, no dummy prefix, byte
    fallback): the bytes of a token stream are the sum over its ids. Used when only a prefix
    of a split is scored.
    """
    out = np.zeros(tok.vocab_size, dtype=np.int64)
    for i in range(tok.vocab_size):
        if tok.is_special(i):
            continue
        if tok.is_byte(i):
            out[i] = 1
        else:
            out[i] = len(tok.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
    return out


def decode_utf8(data: bytes, source: str) -> str:
    """Strict UTF-8 decoding; the error names the file and the first bad byte offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{source}: not UTF-8 text (invalid byte 0x{data[err.start]:02x} "
                         f"at byte offset {err.start})") from None


def score_text(folder: str | os.PathLike, text: str, *, tokenizer=None, device: str = "cpu",
               stride: int | None = None, batch_size: int = 8, rnn_context: int | None = None,
               rnn_chunk: int = 256, dtype: str = "auto", progress: bool = False,
               stride_key: str = "--stride") -> Score:
    """Score one text as one document (its ids, then EOS), exactly as a split is scored (in
    the precision of `evaluate.dtype`'s default: `resolve_dtype`)."""
    tok = tokenizer if tokenizer is not None else Tokenizer.load()
    if not text:
        raise InputError("nothing to score: the text is empty")
    ids = tok.encode_documents([text])
    loaded = load_for_scoring(folder, device=device, rnn_context=rnn_context)
    # Trained with another tokenizer: a smaller vocabulary is caught by score_ids (an id it
    # does not know), a larger one would score silently against the wrong pieces.
    if _vocab_size(loaded) > tok.vocab_size:
        raise InputError(f"{loaded.folder}: the model's vocabulary ({_vocab_size(loaded)}) is not "
                         f"the tokenizer's ({tok.vocab_size}); retrain it with `dvc repro`")
    return score_ids(loaded, ids, len(text.encode("utf-8")), eos_id=tok.eos_id, stride=stride,
                     batch_size=batch_size, rnn_chunk=rnn_chunk, dtype=dtype, progress=progress,
                     stride_key=stride_key)


def pick_device(device: str = "auto", key: str = "evaluate.device") -> str:
    """'auto' -> cuda when available, else cpu; an unavailable device is an input error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise InputError(f"{key}: not a torch device: {device!r} (use auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{key}: {device!r} requested but CUDA is not available here")
    return device


def document_ends(ids, eos_id: int, block: int = 1 << 24) -> np.ndarray:
    """Index of every EOS of a token stream (array, memmap or sharded view), read in blocks;
    a last document without EOS ends at the end of the stream."""
    n = len(ids)
    ends = [a + np.flatnonzero(np.asarray(ids[a:min(a + block, n)]) == eos_id)
            for a in range(0, n, block)]
    out = np.concatenate(ends) if ends else np.empty(0, dtype=np.int64)
    if n and (out.size == 0 or out[-1] != n - 1):
        out = np.append(out, n - 1)
    return out.astype(np.int64)


def sample_documents(ids, max_tokens: int, eos_id: int) -> np.ndarray:
    """About `max_tokens` tokens of whole documents spread over the split, in split order.

    Documents are taken in the order of a permutation seeded with 0, until they hold
    `max_tokens` tokens; the result is cut to exactly `max_tokens`. The seed is fixed, not a
    param, so that every model and every run (whatever `seed` says) is scored on the same
    tokens. A split of one document gives its first `max_tokens` tokens.
    """
    ends = document_ends(ids, eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    order = np.random.default_rng(0).permutation(lengths.size)
    take = int(np.searchsorted(np.cumsum(lengths[order]), max_tokens)) + 1
    picked = np.sort(order[:take])
    return np.concatenate([np.asarray(ids[starts[d]:ends[d] + 1]) for d in picked])[:max_tokens]


def ids_and_bytes(split: str, max_tokens: int | None, tok=None, tokens_root=None
                  ) -> tuple[np.ndarray, int]:
    """A split's ids (capped: `sample_documents`) and the bytes of text they cover."""
    meta = tokens_meta(tokens_root)
    ids = load_tokens(split, tokens_root)
    if max_tokens is None or max_tokens >= len(ids):
        return np.asarray(ids), int(meta["splits"][split]["bytes"])
    if tok is None:
        raise ValueError("a capped split needs the tokenizer to count its bytes")
    ids = sample_documents(ids, max_tokens, int(meta["eos_id"]))
    return ids, int(token_byte_lengths(tok)[ids.astype(np.int64)].sum())

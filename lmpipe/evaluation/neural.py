"""Scoring a token stream with a neural model: the total negative log-likelihood.

How a neural model sees the stream
----------------------------------
Write the model input as ``s = [EOS] + ids`` (length N + 1); target position p = 1..N is
predicted from ``s[:p]``, cut to what fits the model.

* **Non-overlapping windows** (``stride=None`` here; `score_ids`, which the evaluate stage and
  ``lmpipe eval`` call, passes half the context instead): ``s`` is cut into consecutive
  windows of the model's context length C; window k reads ``s[kC:(k+1)C]`` and scores the C
  targets ``s[kC+1:(k+1)C+1]``. Cheap (each token is read once) but the first token of every
  window has almost no context, so the figure is pessimistic by a little.
* **Sliding window** (``stride=S``, 1 <= S <= C): the targets are taken S at a time; each
  chunk of S targets is scored by a window that also reads the C - S tokens before it, so every
  token is scored exactly once with at least C - S + 1 tokens of context (all of them near the
  start of the stream). It costs about C / S forward passes per token. ``stride == C`` is
  exactly the non-overlapping scheme (tested).
* **Recurrent models** have no context length: by default the hidden state is carried through
  the whole stream (the unbounded context the RNN has), in chunks of ``rnn_chunk`` tokens so
  memory stays flat. Giving ``context_length`` for an RNN scores it in windows instead, each
  from a zero state, like a Transformer (use it to reproduce a trainer's windowed figure).

Padding to batch the windows goes on the right; the models are causal, so padded positions
never change the logits of the real ones, and their targets are masked out.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lmpipe.core.errors import InputError
from lmpipe.core.names import IGNORE_INDEX


def windows(n_targets: int, context_length: int, stride: int | None = None,
            stride_key: str = "evaluate.stride") -> list[tuple[int, int, int]]:
    """The windows that score targets 1..n of ``s = [EOS] + ids`` (see the module docstring).

    Returns ``(start, end, first_target)`` per window: the model reads ``s[start:end]``
    (``end - start <= context_length``) and its outputs at positions
    ``first_target - 1 .. end - 1`` predict the targets ``s[first_target : end + 1]``.
    Every target position 1..n is covered exactly once.
    """
    C = int(context_length)
    if C < 1:
        raise ValueError(f"context_length must be >= 1, got {C}")
    S = C if stride is None else int(stride)
    if not 1 <= S <= C:
        raise InputError(f"{stride_key}: must be in [1, context_length={C}], got {stride}")
    out = []
    a = 1                                   # first target position of this chunk
    while a <= n_targets:
        b = min(a + S - 1, n_targets)       # last target position
        start = max(0, a - 1 - (C - S))     # C - S tokens of extra context before the chunk
        out.append((start, b, a))           # reads s[start:b], whose outputs predict s[start+1:b+1]
        a = b + 1
    return out


def _device_of(model) -> "Any":
    return next(model.parameters()).device


def _autocast(device, dtype: str):
    if dtype == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _progress(total: int, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, unit="tok", unit_scale=True, disable=not enabled,
                leave=False, mininterval=1.0)


def score_windows(model, ids: np.ndarray, context_length: int, *, eos_id: int,
                  stride: int | None = None, batch_size: int = 8, dtype: str = "float32",
                  progress: bool = False, desc: str = "scoring",
                  stride_key: str = "evaluate.stride") -> float:
    """Total NLL (nats) of `ids` under a causal model scored in (sliding) windows."""
    ids = np.asarray(ids)
    n = int(ids.size)
    if n == 0:
        return 0.0
    device = _device_of(model)
    s = torch.from_numpy(np.concatenate([[eos_id], ids.astype(np.int64)]))
    wins = windows(n, context_length, stride, stride_key)
    total = torch.zeros((), dtype=torch.float64)
    # one autocast region for every batch: the weights are cast to bf16 once, not per batch
    with torch.inference_mode(), _autocast(device, dtype), _progress(n, desc, progress) as bar:
        for i in range(0, len(wins), batch_size):
            group = wins[i:i + batch_size]
            width = max(end - start for start, end, _ in group)
            x = torch.zeros(len(group), width, dtype=torch.long)
            y = torch.full((len(group), width), IGNORE_INDEX, dtype=torch.long)
            for row, (start, end, first) in enumerate(group):
                length = end - start
                x[row, :length] = s[start:end]
                keep = first - 1 - start            # outputs before this predict context only
                y[row, keep:length] = s[first:end + 1]
            x, y = x.to(device), y.to(device)
            logits = model(x)[0]
            nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1),
                                  ignore_index=IGNORE_INDEX, reduction="none")
            total += nll.double().sum().cpu()       # summed in fp64: exact-ish for long splits
            bar.update(sum(end + 1 - first for _, end, first in group))
    return float(total)


def score_recurrent(model, ids: np.ndarray, *, eos_id: int, chunk: int = 256,
                    dtype: str = "float32", progress: bool = False, desc: str = "scoring") -> float:
    """Total NLL of `ids` under a recurrent model, carrying its state through the stream."""
    ids = np.asarray(ids)
    n = int(ids.size)
    if n == 0:
        return 0.0
    device = _device_of(model)
    s = torch.from_numpy(np.concatenate([[eos_id], ids.astype(np.int64)]))
    total = torch.zeros((), dtype=torch.float64)
    state = None
    with torch.inference_mode(), _progress(n, desc, progress) as bar:
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            x = s[a:b].unsqueeze(0).to(device)
            y = s[a + 1:b + 1].to(device)
            with _autocast(device, dtype):
                logits, _, state = model(x, state=state, return_state=True)
            total += F.cross_entropy(logits[0].float(), y, reduction="none").double().sum().cpu()
            bar.update(b - a)
    return float(total)

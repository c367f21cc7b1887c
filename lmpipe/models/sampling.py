"""Sampling from the neural language models: temperature, top-k, top-p, repetition penalty.

One step turns the last position's logits into a token (logits already divided by the model's
own `config.temperature`, the one fitted on val: that is the distribution `evaluate` scores),
in this order:
  1. repetition penalty (CTRL, Keskar et al. 2019): for every token already in the text,
     logit / penalty if the logit is positive, logit * penalty if not (penalty > 1 discourages);
  2. temperature 0 -> greedy argmax; otherwise logits / temperature;
  3. top-k: keep the k largest logits;
  4. top-p (nucleus, Holtzman et al. 2019): keep the smallest set of most likely tokens whose
     probability mass reaches p;
  5. draw from the renormalised distribution with the given torch.Generator (reproducible).

`generate` drives either model: the Transformer with its key-value cache (or a full recompute
of the cropped context each step when use_cache=False), the RNN by carrying its hidden state.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from lmpipe.core.errors import InputError
from lmpipe.core.names import DEFAULT_SYSTEM_PROMPT
from lmpipe.models.rnn import RNNLM
from lmpipe.models.store import load_model, unwrap_model
from lmpipe.models.transformer import Transformer
from lmpipe.tokenizer.chat_template import encode_chat, stop_ids
from lmpipe.tokenizer.model import Tokenizer


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, repetition_penalty: float = 1.0,
                generated: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token for each row of `logits` [B, V]; returns LongTensor [B].

    `generated` [B, L] holds the ids the repetition penalty applies to (prompt + output so far).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    logits = logits.float()
    if repetition_penalty != 1.0 and generated is not None and generated.numel():
        seen = logits.gather(1, generated)
        seen = torch.where(seen > 0, seen / repetition_penalty, seen * repetition_penalty)
        logits = logits.scatter(1, generated, seen)   # repeated ids write the same value
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        probs_sorted, order = torch.sort(torch.softmax(logits, dim=-1), dim=-1, descending=True)
        mass_before = probs_sorted.cumsum(dim=-1) - probs_sorted
        drop_sorted = mass_before >= top_p          # the set already reached p without it
        drop_sorted[:, 0] = False                   # the most likely token always stays
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _context_length(model: nn.Module) -> int | None:
    return getattr(getattr(model, "config", None), "context_length", None)


@contextlib.contextmanager
def decode_threads(device: torch.device) -> Iterator[None]:
    """One intra-op thread while decoding on a CPU, the caller's count restored after.

    Why: at batch 1 every op of a decode step is tiny (a 256 x 768 matrix-vector product, a
    norm over 256 numbers), so a second thread cannot pay for waking it, and on a busy
    machine it waits for a core at every op. Measured on 2 shared cores (benchmarks/train.py,
    256 tokens, load 8): 290 tok/s with one thread, 200 with two sleeping between ops
    (OMP_WAIT_POLICY=PASSIVE, as the stages set it), 17 with two spinning (the default).
    """
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _stepper(model: nn.Module, buffer: torch.Tensor, total: int, use_cache: bool
             ) -> Callable[[int, int], torch.Tensor]:
    """One way to get the next logits per model kind: step(end, start) reads buffer[:, :end]
    (the positions from `start` on are new to the model) and returns logits [1, ., V]."""
    if isinstance(model, RNNLM):
        state = None

        def step(end: int, start: int) -> torch.Tensor:   # read buffer[start:end], carry state
            nonlocal state
            logits, _, state = model(buffer[:, start:end], state=state, return_state=True)
            return logits
        return step
    context = model.config.context_length
    if not use_cache:
        return lambda end, start: model(buffer[:, max(0, end - context):end])[0]
    cache = model.new_kv_cache(1, min(context, total), device=buffer.device)

    def cached(end: int, start: int) -> torch.Tensor:
        if cache.length >= cache.max_len:   # context full: restart from its last half
            cache.reset()
            start = end - context // 2 - 1
        return model(buffer[:, start:end], kv_cache=cache)[0]
    return cached


@torch.inference_mode()
def generate(model: nn.Module, prompt_ids: Sequence[int], max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             repetition_penalty: float = 1.0, use_cache: bool = True,
             stop_ids: Sequence[int] = (), seed: int = 0,
             device: str | torch.device | None = None) -> list[int]:
    """Continue `prompt_ids`; returns only the new ids (a stop id ends generation, not included).

    Transformer: the prompt must leave room in the context (InputError otherwise). With the
    cache, one prefill then one position per step; past the context the cache is rebuilt from
    the last half context. Without it, each step re-runs the last context_length ids. The two
    paths agree token for token while prompt + output fits the context.
    RNN: the prompt is read once and the hidden state carried; no context limit.
    On a CPU the loop runs on one thread (`decode_threads`).
    """
    model = unwrap_model(model)
    if not isinstance(model, (Transformer, RNNLM)):
        raise TypeError(f"generate() supports Transformer and RNNLM, got {type(model).__name__}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise InputError("the prompt is empty: generation needs at least one token to start from")
    vocab = model.config.vocab_size
    if min(prompt) < 0 or max(prompt) >= vocab:
        raise InputError(f"prompt token ids must be in [0, {vocab}), got {min(prompt)}..{max(prompt)}")
    context = _context_length(model) if isinstance(model, Transformer) else None
    if context is not None and len(prompt) >= context:
        raise InputError(f"the prompt is {len(prompt)} tokens but the model's context is {context} "
                         f"tokens: that leaves no room for new tokens (shorten the prompt to at "
                         f"most {context - 1} tokens)")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval().to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    stops = {int(s) for s in stop_ids}
    # prompt then generated ids, [1, L + max_new_tokens]; buffer[:, :n] is filled
    buffer = torch.empty(1, len(prompt) + max_new_tokens, dtype=torch.long, device=device)
    buffer[:, :len(prompt)] = torch.tensor([prompt], dtype=torch.long, device=device)
    n = len(prompt)
    out: list[int] = []
    step = _stepper(model, buffer, n + max_new_tokens, use_cache)
    try:
        with decode_threads(device):
            logits = step(n, 0)
            for _ in range(max_new_tokens):
                nxt = sample_next(logits[:, -1], temperature, top_k, top_p, repetition_penalty,
                                  buffer[:, :n] if repetition_penalty != 1.0 else None, generator)
                tok = int(nxt.item())
                if tok in stops:
                    break
                out.append(tok)
                buffer[0, n] = tok
                n += 1
                if len(out) == max_new_tokens:
                    break
                logits = step(n, n - 1)
    finally:
        model.train(was_training)
    return out


def generate_text(model_dir: str | os.PathLike, prompt: str, max_new_tokens: int = 200,
                  temperature: float = 0.8, top_k: int | None = None, top_p: float | None = None,
                  repetition_penalty: float = 1.0, seed: int = 0,
                  tokenizer_path: str | os.PathLike | None = None,
                  device: str | torch.device | None = None) -> str:
    """Load the model in `model_dir` and the project tokenizer; return prompt + continuation.

    As in training and evaluation, the text is read as the start of a document: the model is
    fed [EOS] + prompt ids. Generation stops early at the next EOS.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, info = load_model(model_dir, device=device)
    tok = Tokenizer.load(tokenizer_path) if tokenizer_path is not None else Tokenizer.load()
    vocab, tok_vocab = int(info["config"]["vocab_size"]), getattr(tok, "vocab_size", None)
    if tok_vocab is not None and vocab != tok_vocab:   # trained with another tokenizer
        raise InputError(f"{model_dir}: the model's vocabulary ({vocab}) is not the tokenizer's "
                         f"({tok_vocab}); retrain it with `dvc repro`")
    prompt_ids = list(tok.encode(prompt))
    context = _context_length(model) if isinstance(model, Transformer) else None
    if context is not None and len(prompt_ids) + 1 >= context:
        raise InputError(
            f"the prompt is {len(prompt_ids)} tokens ({len(prompt_ids) + 1} with the EOS that "
            f"starts a document) but the model's context is {context} tokens: that leaves no "
            f"room for new tokens (shorten the prompt to at most {context - 2} tokens)")
    new = generate(model, [tok.eos_id] + prompt_ids, max_new_tokens, temperature=temperature,
                   top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                   use_cache=True, stop_ids=(tok.eos_id,), seed=seed, device=device)
    return tok.decode(prompt_ids + new)


def generate_reply(model, tok, prompt: str, *, system: str | None = DEFAULT_SYSTEM_PROMPT,
                   history: Sequence[tuple[str, str]] = (), max_new_tokens: int = 128,
                   temperature: float = 0.7, top_k: int | None = None,
                   top_p: float | None = None, repetition_penalty: float = 1.0,
                   seed: int = 0, device=None) -> str:
    """The assistant's answer to `prompt`: templated, KV-cached sampling, stopped at
    ``<|im_end|>``. The oldest `history` exchanges are left out when the prompt would not leave
    room for `max_new_tokens` in the model's context; the answer is capped to what fits."""
    context = model.config.context_length
    history = list(history)
    ids = encode_chat(tok, prompt, system=system, history=history).ids
    while history and len(ids) + max_new_tokens > context:
        history.pop(0)
        ids = encode_chat(tok, prompt, system=system, history=history).ids
    if len(ids) >= context:
        raise InputError(f"the prompt is {len(ids)} tokens with the chat template, but the "
                         f"model's context is {context} tokens; shorten it")
    new = generate(model, ids, min(max_new_tokens, context - len(ids)), temperature=temperature,
                   top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                   use_cache=True, stop_ids=stop_ids(tok), seed=seed, device=device)
    return tok.decode(new)

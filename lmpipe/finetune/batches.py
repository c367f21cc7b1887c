"""Batches of instruction examples: padded (not packed), masked, resumable.

Batches are padded, not packed
------------------------------
Each row of a batch is one example, padded on the right with ``<pad>`` (targets -100) to the
longest example of the batch. The model is causal, so right padding never changes the logits of
real positions, and no example attends to another: the loss of an example does not depend on
which examples share its batch (packing would either leak attention across examples or need a
block-diagonal mask). The instruction sets here are short, so the padding cost is small;
batches are cut from a length-sorted order within random chunks to keep it smaller still.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from lmpipe.core.errors import InputError
from lmpipe.core.names import IGNORE_INDEX
from lmpipe.finetune.examples import Example, inputs_and_targets


def pad_batch(examples: Sequence[Example], pad_id: int,
              pad_to_multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), LongTensor [B, T]: right-padded with `pad_id` / -100."""
    pairs = [inputs_and_targets(e) for e in examples]
    T = max(len(x) for x, _ in pairs)
    T = int(math.ceil(T / pad_to_multiple) * pad_to_multiple)
    x = torch.full((len(pairs), T), pad_id, dtype=torch.long)
    y = torch.full((len(pairs), T), IGNORE_INDEX, dtype=torch.long)
    for b, (inp, tgt) in enumerate(pairs):
        x[b, : len(inp)] = torch.tensor(inp, dtype=torch.long)
        y[b, : len(tgt)] = torch.tensor(tgt, dtype=torch.long)
    return x, y


def epoch_order(n: int, batch_size: int, seed: int, epoch: int,
                lengths: Sequence[int] | None = None, chunk_batches: int = 16) -> list[list[int]]:
    """Batches of example indices for one epoch, a pure function of (seed, epoch).

    Shuffled; with `lengths`, each run of `chunk_batches` batches is sorted by length before
    it is cut, so a batch holds examples of similar length (less padding), and the batches are
    then shuffled again so long and short ones alternate.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    if lengths is not None:
        chunk = batch_size * chunk_batches
        parts = []
        for s in range(0, n, chunk):
            part = order[s : s + chunk]
            parts.append(part[np.argsort([lengths[i] for i in part], kind="stable")])
        order = np.concatenate(parts) if parts else order
    batches = [order[s : s + batch_size].tolist() for s in range(0, n, batch_size)]
    perm = rng.permutation(len(batches))
    return [batches[i] for i in perm]


class InstructBatches:
    """An endless, resumable stream of padded (inputs, targets) batches over epochs.

    The position is (epoch, batch index): `state_dict` / `load_state_dict` let a resumed run
    continue with exactly the batches an uninterrupted one would have seen. Under data
    parallelism each step cuts a global batch of ``batch_size * world_size`` examples and
    rank r takes the r-th slice (as `lmpipe.data.batches.TokenBatches` does). The counters of the
    tokens actually served travel with the state.
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, pad_id: int,
                 seed: int = 0, pad_to_multiple: int = 8, rank: int = 0, world_size: int = 1):
        if not examples:
            raise InputError("no training examples left after the truncation rule "
                             "(raise max_seq_len or use overflow: truncate)")
        self.examples = list(examples)
        self.batch_size = int(batch_size)
        self.pad_id = pad_id
        self.seed = seed
        self.pad_to_multiple = pad_to_multiple
        self.rank, self.world_size = int(rank), int(world_size)
        self.lengths = [len(e.ids) for e in self.examples]
        self.epoch = 0
        self.index = 0
        self.tokens_served = 0            # input positions of real (unpadded) examples
        self.response_tokens_served = 0   # targets that count in the loss
        self._order = self._make_order()

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.examples) / self.global_batch)

    @property
    def tokens_per_batch(self) -> int:
        """Mean input tokens of one global batch (the trainer's token counter; padding not
        counted). The exact counts are `tokens_served` / `response_tokens_served`."""
        mean = sum(self.lengths) / len(self.lengths) - 1
        return max(1, round(mean * min(self.global_batch, len(self.examples))))

    def _make_order(self) -> list[list[int]]:
        return epoch_order(len(self.examples), self.global_batch, self.seed, self.epoch,
                           self.lengths)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.index >= len(self._order):
            self.epoch += 1
            self.index = 0
            self._order = self._make_order()
        idx = self._order[self.index]
        self.index += 1
        for i in idx:
            self.tokens_served += self.lengths[i] - 1
            self.response_tokens_served += self.examples[i].n_response_tokens
        share = math.ceil(len(idx) / self.world_size)
        mine = idx[self.rank * share:(self.rank + 1) * share] or idx[-1:]
        return pad_batch([self.examples[i] for i in mine], self.pad_id, self.pad_to_multiple)

    next_batch = __next__ = next

    def __iter__(self):
        return self

    def epochs_done(self) -> float:
        return self.epoch + self.index / max(1, len(self._order))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed,
                "n_examples": len(self.examples), "tokens_served": self.tokens_served,
                "response_tokens_served": self.response_tokens_served}

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("n_examples", len(self.examples))) != len(self.examples):
            raise ValueError(f"loader state is for {state['n_examples']} examples, this loader "
                             f"has {len(self.examples)}")
        self.epoch = int(state["epoch"])
        self.index = int(state["index"])
        self.tokens_served = int(state.get("tokens_served", 0))
        self.response_tokens_served = int(state.get("response_tokens_served", 0))
        self._order = self._make_order()


def eval_batches(examples: Sequence[Example], batch_size: int, pad_id: int,
                 n_batches: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed padded batches of held-out examples (the trainer's periodic val loss)."""
    chosen = list(examples)
    if n_batches is not None and len(chosen) > batch_size * n_batches:
        step = len(chosen) / (batch_size * n_batches)
        chosen = [chosen[int(i * step)] for i in range(batch_size * n_batches)]
    chosen.sort(key=lambda e: len(e.ids))
    return [pad_batch(chosen[s:s + batch_size], pad_id) for s in range(0, len(chosen), batch_size)]

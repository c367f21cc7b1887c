"""Batches of token windows from the memory-mapped token files, in a resumable order.

The training stream (``data/tokens/train.bin``) is cut into windows of ``seq_len + 1`` tokens
(inputs ``w[:-1]``, targets ``w[1:]``), consecutive windows ``seq_len`` apart. Each epoch
uses a fresh random start offset in ``[0, seq_len)`` (so window boundaries move between
epochs) and a fresh random order of the windows; both come from a generator seeded with
``(seed, epoch)``. The loader's whole state is therefore ``(epoch, index)``: the next window
is number ``index`` of epoch ``epoch``'s order. Saving and restoring those two integers
reproduces the batch sequence exactly, with no generator state to carry.

Under data parallelism each step takes ``batch_size * world_size`` consecutive windows of the
order (the *global* batch), and rank ``r`` reads the ``r``-th slice of ``batch_size`` windows.
The global batch sequence does not depend on how it is split: one process with batch
``2B`` reads exactly the windows that two processes with batch ``B`` read together.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lmpipe.core.errors import InputError


class TokenBatches:
    """Random non-overlapping windows of a token stream, one epoch after another.

    `next()` returns ``(x, y)``, int64 tensors of shape ``[batch_size, seq_len]`` with
    ``y[:, t] = x[:, t + 1]`` in the stream, for this rank's slice of the global batch.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, name: str = "train"):
        if seq_len < 1 or batch_size < 1:
            raise ValueError("seq_len and batch_size must be >= 1")
        self.tokens = tokens
        self.seq_len = int(seq_len)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        # The same number of windows in every epoch, whatever the offset: a window starting
        # at offset + w * T needs T + 1 tokens and the offset is at most T - 1.
        self.n_windows = (len(tokens) - self.seq_len) // self.seq_len
        if self.n_windows < 1:
            raise InputError(
                f"the {name} split has {len(tokens)} tokens: too few for one training window of "
                f"context_length + 1 = {self.seq_len + 1} tokens (plus up to {self.seq_len - 1} "
                "of random offset); lower the context length or use more data"
            )
        self.epoch = 0
        self.index = 0
        self._order_epoch = -1
        self._offset = 0
        self._order: np.ndarray | None = None

    # -- the order of one epoch, a pure function of (seed, epoch)
    def _epoch_order(self, epoch: int) -> tuple[int, np.ndarray]:
        if epoch != self._order_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._offset = int(rng.integers(0, self.seq_len))
            self._order = rng.permutation(self.n_windows)
            self._order_epoch = epoch
        assert self._order is not None
        return self._offset, self._order

    def _take_starts(self, count: int) -> list[int]:
        """Start positions of the next `count` windows of the global order (advances)."""
        starts: list[int] = []
        while len(starts) < count:
            offset, order = self._epoch_order(self.epoch)
            take = min(count - len(starts), self.n_windows - self.index)
            starts.extend(int(offset + w * self.seq_len) for w in order[self.index:self.index + take])
            self.index += take
            if self.index >= self.n_windows:
                self.epoch += 1
                self.index = 0
        return starts

    @property
    def windows_per_step(self) -> int:
        return self.batch_size * self.world_size

    @property
    def tokens_per_batch(self) -> int:
        """Target tokens in one global micro-batch (all ranks together)."""
        return self.windows_per_step * self.seq_len

    def epochs_done(self) -> float:
        return self.epoch + self.index / self.n_windows

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self._take_starts(self.windows_per_step)
        mine = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        T = self.seq_len
        rows = np.stack([np.asarray(self.tokens[s:s + T + 1], dtype=np.int64) for s in mine])
        block = torch.from_numpy(rows)
        return block[:, :-1], block[:, 1:]

    __next__ = next

    def __iter__(self):
        return self

    # -- resumable state
    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed,
                "seq_len": self.seq_len, "n_windows": self.n_windows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "seq_len", "n_windows"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(f"loader state is for {key}={state[key]}, this loader has "
                                 f"{key}={getattr(self, key)}")
        self.epoch = int(state["epoch"])
        self.index = int(state["index"])


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int, n_batches: int | None,
                 name: str = "val") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed set of windows spread evenly over a split, for the periodic val loss.

    The same windows every time (no randomness), so successive val losses are comparable
    and the whole run is deterministic. Fewer batches come back when the split is short;
    ``n_batches=None`` takes every non-overlapping window of the split (all of it but the
    last partial window), which is what model selection on validation should see.
    """
    T = int(seq_len)
    n_windows = (len(tokens) - 1) // T
    if n_windows < 1:
        raise InputError(f"the {name} split has {len(tokens)} tokens: too few for one window of "
                         f"context_length + 1 = {T + 1} tokens")
    want = n_windows if n_batches is None else min(n_windows, batch_size * n_batches)
    picks = np.unique(np.linspace(0, n_windows - 1, want).round().astype(np.int64))
    out = []
    for i in range(0, len(picks), batch_size):
        rows = np.stack([np.asarray(tokens[w * T:w * T + T + 1], dtype=np.int64)
                         for w in picks[i:i + batch_size]])
        block = torch.from_numpy(rows)
        out.append((block[:, :-1], block[:, 1:]))
    return out

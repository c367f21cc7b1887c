"""A recurrent language model: embedding, stacked recurrent layers, linear output.

Elman RNN (cell 'rnn'), layer l, time t:
    h_t^l = tanh( W_x^l x_t^l + W_h^l h_{t-1}^l + b^l ),     x_t^1 = E[idx_t],  x_t^{l+1} = h_t^l
    logits_t = (W_out h_t^L + b_out) / T                      (W_out = E when tie_embeddings;
                                                               T: fitted on val after training)

`ElmanLayer` below computes exactly this, in plain sight. It is also fast: the input term
W_x x_t + b does not depend on the past, so it is one matmul for the whole sequence; only the
recurrent term W_h h_{t-1} is a loop over time. `tests/test_models.py` checks it against
`torch.nn.RNN`. 'lstm' and 'gru' use `nn.LSTM` / `nn.GRU` for comparison.

Loss: mean cross-entropy, in fp32, over the targets that are not -100.
"""

from __future__ import annotations

import torch
from torch import nn

from lmpipe.models.configs import RNNConfig
from lmpipe.models.transformer import lm_loss

State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class ElmanLayer(nn.Module):
    """One tanh RNN layer: h_t = tanh(W_x x_t + b + W_h h_{t-1}), over x [B, T, d_in]."""

    def __init__(self, d_in: int, d_hidden: int):
        super().__init__()
        self.d_hidden = d_hidden
        self.W_x = nn.Linear(d_in, d_hidden, bias=True)        # input-to-hidden, with bias b
        self.W_h = nn.Linear(d_hidden, d_hidden, bias=False)   # hidden-to-hidden
        bound = d_hidden ** -0.5                               # torch.nn.RNN's init
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        xw = self.W_x(x)                            # [B, T, H]: the input term, all t at once
        if h is None:
            h = xw.new_zeros(B, self.d_hidden)
        h = h.to(xw.dtype)
        W_h = self.W_h.weight.to(xw.dtype)          # under autocast, matches the input term
        outs = []
        for t in range(T):                          # the recurrence itself
            h = torch.tanh(torch.addmm(xw[:, t], h, W_h.t()))   # xw_t + h_{t-1} W_h^T
            outs.append(h)
        return torch.stack(outs, dim=1), h


class RNNLM(nn.Module):
    def __init__(self, config: RNNConfig | dict):
        super().__init__()
        cfg = config if isinstance(config, RNNConfig) else RNNConfig(**config)
        if cfg.vocab_size is None:
            raise ValueError("RNNConfig.vocab_size must be set (the tokenizer's)")
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_embed)
        self.dropout = nn.Dropout(cfg.dropout)
        if cfg.cell == "rnn":
            self.layers = nn.ModuleList(
                ElmanLayer(cfg.d_embed if i == 0 else cfg.d_hidden, cfg.d_hidden)
                for i in range(cfg.n_layer))
        else:
            cls = nn.LSTM if cfg.cell == "lstm" else nn.GRU
            self.rnn = cls(cfg.d_embed, cfg.d_hidden, num_layers=cfg.n_layer, batch_first=True,
                           dropout=cfg.dropout if cfg.n_layer > 1 else 0.0)
        self.head = nn.Linear(cfg.d_hidden, cfg.vocab_size)
        nn.init.normal_(self.embed.weight, std=0.02 if cfg.tie_embeddings else 1.0)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        else:
            nn.init.normal_(self.head.weight, std=cfg.d_hidden ** -0.5)
        nn.init.zeros_(self.head.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                state: State | None = None, return_state: bool = False):
        """logits [B, T, V] and loss; with return_state=True also the final state to carry on.

        The state is [n_layer, B, d_hidden] ('rnn', 'gru') or a pair (h, c) of those ('lstm').
        """
        x = self.dropout(self.embed(idx))
        if self.config.cell == "rnn":
            finals = []
            for i, layer in enumerate(self.layers):
                x, h = layer(x, None if state is None else state[i])
                finals.append(h)
                x = self.dropout(x)   # between layers and before the output
            new_state = torch.stack(finals)
        else:
            if state is not None:
                state = tuple(s.to(x.dtype) for s in state) if isinstance(state, tuple) \
                    else state.to(x.dtype)
            x, new_state = self.rnn(x, state)
            x = self.dropout(x)
        logits = self.head(x)
        if self.config.temperature is not None:   # None while training: T = 1
            logits = logits / self.config.temperature
        loss = None if targets is None else lm_loss(logits, targets)
        if return_state:
            return logits, loss, new_state
        return logits, loss

"""The model configs: the one schema of each model's shape, for params.yaml and config.json.

`params.yaml` holds them as `pretrain.model` and `rnn.model` (validated through these very
classes, so a bad value is reported as `pretrain.model.n_head: ...`); a trained model's
`config.json` holds the same fields with `vocab_size` filled in from the tokenizer. Kept
apart from the model files, and free of torch, so that reading params stays fast.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lmpipe.core.errors import InputError

VOCAB_FROM_TOKENIZER = ("the vocabulary size; null in params.yaml: the tokenizer's "
                        "(the training stage fills it in)")


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    vocab_size: int | None = Field(default=None, ge=1, description=VOCAB_FROM_TOKENIZER)
    temperature: float | None = Field(
        default=None, gt=0,
        description="the logits are divided by it (lmpipe/train/calibration.py); null in "
        "params.yaml: 1 while training, then fitted on the val split (the training stage fills "
        "it in); a number fixes it, in training too (1.0: no calibration)")

    def with_vocab(self, vocab_size: int, key: str) -> "ModelConfig":
        """This config for a tokenizer of `vocab_size` pieces; `key` names it in errors."""
        if self.vocab_size is not None and self.vocab_size != vocab_size:
            raise InputError(f"{key}.vocab_size: the tokenizer has {vocab_size} pieces, got "
                             f"{self.vocab_size} (leave it null)")
        return self.model_copy(update={"vocab_size": int(vocab_size)})


class TransformerConfig(ModelConfig):
    """lmpipe/models/transformer.py; the defaults are the default profile's `pretrain.model`."""

    context_length: int = Field(default=256, ge=1, description="positions the model attends over")
    n_layer: int = Field(default=4, ge=1, le=256)
    n_head: int = Field(default=4, ge=1)
    d_model: int = Field(default=256, ge=2)
    mlp_ratio: float = Field(default=4.0, gt=0, description="MLP width / d_model (SwiGLU: 2/3 of it)")
    # 0.1: the default profile's val loss is lowest there of 0.0 / 0.1 / 0.2 (benchmarks/
    # sweep_default.py); 0.2 is still under-trained at the default budget.
    dropout: float = Field(default=0.1, ge=0, lt=1)
    tie_embeddings: bool = True
    rope_theta: float = Field(default=10000.0, gt=0)
    bias: bool = False
    activation: Literal["swiglu", "gelu"] = "swiglu"
    norm_eps: float = Field(default=1e-5, gt=0)
    # QK-norm: RMSNorm on each head's q and k before RoPE. On the default profile (3M tokens,
    # AMD EPYC) val / test bits per byte 1.943 / 2.261 with it, 1.995 / 2.286 without.
    qk_norm: bool = True

    @model_validator(mode="after")
    def _heads(self) -> "TransformerConfig":
        if self.d_model % self.n_head:
            raise ValueError(f"n_head: must divide d_model ({self.d_model}), got {self.n_head}")
        if (self.d_model // self.n_head) % 2:
            raise ValueError(f"n_head: head size d_model/n_head = {self.d_model // self.n_head} "
                             "must be even for RoPE")
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def mlp_hidden(self) -> int:
        """MLP hidden width; SwiGLU uses 2/3 of it (rounded up to a multiple of 32) for equal cost."""
        hidden = self.mlp_ratio * self.d_model
        if self.activation == "swiglu":
            return max(32, int(math.ceil(2 * hidden / 3 / 32) * 32))
        return max(1, int(round(hidden)))


class RNNConfig(ModelConfig):
    """lmpipe/models/rnn.py; the defaults are the default profile's `rnn.model`."""

    # The gated cell by default: on the default profile the Elman cell ("rnn", one param
    # away) does not beat the 4-gram on validation at any width, dropout or budget tried;
    # the GRU does, on both splits (README, "Why these defaults").
    cell: Literal["rnn", "lstm", "gru"] = "gru"
    n_layer: int = Field(default=1, ge=1, le=64)
    d_embed: int = Field(default=256, ge=1)
    d_hidden: int = Field(default=512, ge=1)
    dropout: float = Field(default=0.2, ge=0, lt=1)
    tie_embeddings: bool = False

    @model_validator(mode="after")
    def _tying(self) -> "RNNConfig":
        if self.tie_embeddings and self.d_embed != self.d_hidden:
            raise ValueError(f"tie_embeddings: needs d_embed == d_hidden, got {self.d_embed} "
                             f"and {self.d_hidden}")
        return self

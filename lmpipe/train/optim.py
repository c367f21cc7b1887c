"""The optimizers and the learning-rate schedule of every neural stage.

Parameter groups (decided here, once, for every model)
    * weight decay (decoupled, AdamW-style) applies to *matrices*: every parameter with two or
      more dimensions except embedding tables. Gains, biases and other vectors never decay;
      embeddings do not either (decaying them pulls rare tokens' rows to zero, and with tied
      weights the output head is the same tensor, so it follows the embedding). An untied
      output head is an ordinary matrix and decays.
    * optimizer: muon puts the 2-D *hidden* matrices (attention and MLP weights, recurrent
      weights) on `torch.optim.Muon` (orthogonalised momentum, `adjust_lr_fn="match_rms_adamw"`
      so the AdamW learning rate carries over); embeddings, the output head, gains and biases
      stay on AdamW.

Schedule: ``lr(step) = lr * (step + 1) / warmup`` for the first ``warmup_steps`` steps, then
``min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2`` where p runs from 0 to 1 over the remaining
steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lmpipe.core.errors import InputError


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based: the step about to be taken).

    Linear warmup from lr/warmup to lr over `warmup_steps` steps, then cosine decay from lr
    to min_lr at the last step. A function of the step alone: never of the clock.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    p = min(1.0, max(0.0, (step - warmup_steps) / max(1, max_steps - warmup_steps)))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * p))


# ----------------------------------------------------------------------------- param groups
def _embedding_params(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def _head_params(model: nn.Module) -> set[int]:
    """The output projection: a module attribute named `head`/`lm_head`, or any matrix with
    vocab_size rows."""
    ids = set()
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 2)
        if p.ndim == 2 and (name in ("head.weight", "lm_head.weight")
                            or (len(leaf) >= 2 and leaf[-2] in ("head", "lm_head"))
                            or (vocab is not None and p.shape[0] == vocab)):
            ids.add(id(p))
    return ids


@dataclass
class ParamGroups:
    decay: list[nn.Parameter] = field(default_factory=list)      # AdamW, weight decay
    no_decay: list[nn.Parameter] = field(default_factory=list)   # AdamW, no decay
    muon: list[nn.Parameter] = field(default_factory=list)       # Muon (hidden matrices)
    names: dict[str, list[str]] = field(default_factory=dict)


def param_groups(model: nn.Module, use_muon: bool = False) -> ParamGroups:
    """Split the trainable parameters (each shared tensor once) into the optimizer groups."""
    emb, head = _embedding_params(model), _head_params(model)
    g = ParamGroups(names={"decay": [], "no_decay": [], "muon": []})
    for name, p in model.named_parameters():   # tied tensors are yielded once
        if not p.requires_grad:
            continue
        if p.ndim < 2 or id(p) in emb:
            key = "no_decay"
        elif use_muon and p.ndim == 2 and id(p) not in head:
            key = "muon"
        else:
            key = "decay"
        getattr(g, key).append(p)
        g.names[key].append(name)
    return g


def build_optimizers(model: nn.Module, cfg: Any, device: torch.device) -> list[torch.optim.Optimizer]:
    """AdamW (+ Muon) with per-group `base_lr`; the schedule scales every group's lr."""
    groups = param_groups(model, use_muon=cfg.optimizer == "muon")
    adam_groups = []
    if groups.decay:
        adam_groups.append({"params": groups.decay, "weight_decay": cfg.weight_decay,
                            "base_lr": cfg.lr})
    if groups.no_decay:
        adam_groups.append({"params": groups.no_decay, "weight_decay": 0.0, "base_lr": cfg.lr})
    opts: list[torch.optim.Optimizer] = []
    if adam_groups:
        kwargs: dict[str, Any] = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps}
        if device.type == "cuda":
            kwargs["fused"] = True
        opts.append(torch.optim.AdamW(adam_groups, **kwargs))
    if groups.muon:
        muon_lr = cfg.muon_lr if cfg.muon_lr is not None else cfg.lr
        opts.append(torch.optim.Muon(
            [{"params": groups.muon, "base_lr": muon_lr}], lr=muon_lr,
            weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum,
            adjust_lr_fn="match_rms_adamw"))
    if not opts:
        raise InputError("the model has no trainable parameters")
    return opts

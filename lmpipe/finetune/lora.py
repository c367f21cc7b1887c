"""LoRA on the project's own Transformer, through `peft`.

A frozen linear layer W (d_out x d_in) gets a trainable low-rank update (Hu et al. 2021):

    y = W x + (alpha / r) * B A dropout(x),     A: r x d_in (random),  B: d_out x r (zeros)

B starts at zero, so before training the adapted model *is* the base model. Only A and B
train; merging folds the update into the weight, W' = W + (alpha / r) B A, so inference costs
nothing extra.

peft serves our model cleanly: `get_peft_model` finds the `nn.Linear` layers by name
(`attn.qkv`, `attn.proj`, `mlp.fc`, `mlp.proj`), `save_pretrained` writes the adapter in
PEFT's standard format (adapter_config.json + adapter_model.safetensors) and
`PeftModel.from_pretrained(base, folder)` loads it back. One adaptation: peft reads
`model.config` as a dict (`.to_dict()`, `.get(...)`) when it merges, and ours is a pydantic
model, so the model is given a config subclass with `to_dict` for as long as peft holds it
(`_peft_ready`); `merge` gives it its plain config back.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from lmpipe.core.errors import InputError
from lmpipe.core.files import atomic_dir
from lmpipe.models.configs import TransformerConfig

ATTENTION_TARGETS = ("attn.qkv", "attn.proj")
MLP_TARGETS = ("mlp.fc", "mlp.proj")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def target_modules(attention: Sequence[str], include_mlp: bool) -> list[str]:
    """The module-name suffixes to adapt: the given attention ones, plus the MLP's if asked."""
    out = list(dict.fromkeys(attention))
    if include_mlp:
        out += [t for t in MLP_TARGETS if t not in out]
    return out


def _peft_ready(model: nn.Module) -> nn.Module:
    """Give the Transformer a config that peft can read as a dict (see the module docstring)."""
    cfg = model.config
    if isinstance(cfg, TransformerConfig) and not hasattr(cfg, "to_dict"):
        class _PeftConfig(type(cfg)):
            def to_dict(self) -> dict:
                return {**self.model_dump(), "model_type": "lmpipe-transformer",
                        "tie_word_embeddings": self.tie_embeddings}

        model.config = _PeftConfig(**cfg.model_dump())
    return model


def _plain_config(model: nn.Module) -> nn.Module:
    if type(model.config) is not TransformerConfig and isinstance(model.config, TransformerConfig):
        model.config = TransformerConfig(**model.config.model_dump())
    return model


def add_lora(model: nn.Module, r: int, alpha: float, dropout: float,
             targets: Sequence[str], param: str = "lora.target_modules"):
    """Wrap `model` in a peft LoRA model: base weights frozen, only A and B train."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in names):
            raise InputError(f"{param}: no linear layer named {t!r} in the model "
                             f"(linear layers end in: {sorted({n.split('.', 2)[-1] for n in names})})")
    cfg = LoraConfig(r=int(r), lora_alpha=alpha, lora_dropout=float(dropout),
                     target_modules=list(targets), bias="none")
    return get_peft_model(_peft_ready(model), cfg)


def save_adapter(peft_model, folder: str | os.PathLike) -> int:
    """Write the adapter alone (PEFT format) to `folder` atomically; returns its size in bytes.

    peft's generated model card (README.md, boilerplate) is not kept: the folder holds exactly
    adapter_config.json and adapter_model.safetensors. peft keeps `target_modules` as a Python
    set and writes it in the set's iteration order, which follows the process's string-hash
    seed (PYTHONHASHSEED): the list is sorted, so the same adapter is the same bytes in any
    process.
    """
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        peft_model.save_pretrained(str(tmp))
        for extra in Path(tmp).iterdir():
            if extra.name not in ADAPTER_FILES:
                shutil.rmtree(extra) if extra.is_dir() else extra.unlink()
        config = Path(tmp) / "adapter_config.json"
        settings = json.loads(config.read_text(encoding="utf-8"))
        settings = {k: sorted(v) if k == "target_modules" and isinstance(v, list) else v
                    for k, v in settings.items()}
        config.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return dir_size(folder)


def load_adapter(base_model: nn.Module, folder: str | os.PathLike, trainable: bool = False):
    """`PeftModel.from_pretrained(base, folder)` on the project's Transformer."""
    folder = Path(folder)
    missing = [f for f in ADAPTER_FILES if not (folder / f).is_file()]
    if missing:
        raise InputError(f"{folder}: not a LoRA adapter (missing {', '.join(missing)}); "
                         f"run `dvc repro lora`")
    return PeftModel.from_pretrained(_peft_ready(base_model), str(folder), is_trainable=trainable)


def merge(peft_model) -> nn.Module:
    """Fold the adapters into the base weights: a plain Transformer, W' = W + (alpha/r) B A."""
    merged = peft_model.merge_and_unload()
    return _plain_config(merged)


@torch.no_grad()
def merge_checked(peft_model, probe: torch.Tensor) -> tuple[nn.Module, float]:
    """`merge`, and the largest change it makes to the logits of `probe` (ids [B, T]): the
    merged model must compute what base + adapter computed (rounding only)."""
    peft_model.eval()
    before = peft_model(probe)[0].float()
    merged = merge(peft_model)
    return merged, float((merged(probe)[0].float() - before).abs().max())


def dir_size(folder: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())

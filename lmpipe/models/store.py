"""Build, save and load the neural models: a model folder is model.safetensors (the weights)
and config.json (what rebuilds the model around them); nothing is unpickled."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from pydantic import BaseModel, ValidationError
from torch import nn

from lmpipe.core.errors import InputError
from lmpipe.core.files import atomic_path, write_json_atomic
from lmpipe.core.names import MODEL_CONFIG_FILE, WEIGHTS_FILE
from lmpipe.models.configs import RNNConfig, TransformerConfig
from lmpipe.models.rnn import RNNLM
from lmpipe.models.transformer import Transformer

MODEL_TYPES: dict[str, tuple[type[nn.Module], type[BaseModel]]] = {
    "transformer": (Transformer, TransformerConfig),
    "rnn": (RNNLM, RNNConfig),
}

def _config_dict(config: dict | BaseModel) -> dict:
    return config.model_dump(mode="json") if isinstance(config, BaseModel) else dict(config)


def build_model(model_type: str, config: dict | BaseModel) -> nn.Module:
    """A freshly initialised model of `model_type` ('transformer' or 'rnn') from its config."""
    if model_type not in MODEL_TYPES:
        raise InputError(f"unknown model_type {model_type!r}; expected one of {sorted(MODEL_TYPES)}")
    cls, cfg_cls = MODEL_TYPES[model_type]
    try:
        cfg = cfg_cls.model_validate(_config_dict(config))
    except ValidationError as e:
        raise InputError(f"invalid {model_type} config: {e}") from None
    return cls(cfg)


def model_type_of(model: nn.Module) -> str:
    """'transformer' or 'rnn': the name config.json records for the model's class."""
    plain = unwrap_model(model)
    for name, (cls, _) in MODEL_TYPES.items():
        if isinstance(plain, cls):
            return name
    raise TypeError(f"not an lmpipe model: {type(plain).__name__}")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model inside DDP, torch.compile or peft wrappers (LoRA layers stay injected)."""
    while True:
        if hasattr(model, "_orig_mod"):            # torch.compile
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):   # peft
            model = model.get_base_model()
        else:
            return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters, each shared (tied) tensor counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def trainable_summary(model: nn.Module) -> dict[str, float]:
    """Trainable and total parameters (tied tensors once), and the trainable percentage."""
    params = list(model.parameters())   # de-duplicates tied tensors
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    return {"trainable_params": trainable, "total_params": total,
            "trainable_pct": 100.0 * trainable / total if total else 0.0}


def save_model(model: nn.Module, folder: str | os.PathLike, model_type: str,
               config: dict | BaseModel, extra: dict[str, Any] | None = None) -> Path:
    """Write `folder/model.safetensors` and `folder/config.json`, each atomically.

    Other files in `folder` are left alone. config.json is written last, so a folder whose
    config.json exists always has complete weights beside it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plain = unwrap_model(model)
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        # save_model (not save_file) de-duplicates tied tensors instead of refusing them
        # No metadata of our own (config.json carries it): safetensors stores the header's
        # metadata as a hash map, so two or more entries come out in a different order on
        # every save and the file would not be byte-identical across runs.
        safetensors.torch.save_model(plain, str(tmp))
    # every field written out, defaults included: a default that changes later (as qk_norm's
    # did) never changes what a saved folder means
    full = MODEL_TYPES[model_type][1].model_validate(_config_dict(config)).model_dump(mode="json")
    info = {**(extra or {}), "model_type": model_type, "config": full}
    write_json_atomic(folder / MODEL_CONFIG_FILE, info)
    return folder


def load_model(folder: str | os.PathLike, device: str | torch.device = "cpu"
               ) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from `folder/config.json` and load its weights strictly.

    Returns (model in eval mode on `device`, the config.json contents). Any missing, corrupt or
    mismatched file raises InputError naming it.
    """
    folder = Path(folder)
    cfg_path, weights = folder / MODEL_CONFIG_FILE, folder / WEIGHTS_FILE
    try:
        info = json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{cfg_path}: no model config here (train the model first)") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{cfg_path}: unreadable model config: {e}") from None
    if not isinstance(info, dict) or "model_type" not in info or "config" not in info:
        raise InputError(f"{cfg_path}: expected keys 'model_type' and 'config'")
    if info["model_type"] == "transformer" and isinstance(info["config"], dict):
        # saved before QK-norm existed: those models have none (their weights say so too)
        info["config"].setdefault("qk_norm", False)
    try:
        model = build_model(info["model_type"], info["config"])
    except InputError as e:
        raise InputError(f"{cfg_path}: {e}") from None
    if not weights.is_file():
        raise InputError(f"{weights}: model weights not found")
    try:
        missing, unexpected = safetensors.torch.load_model(model, str(weights), strict=True)
    except Exception as e:   # SafetensorError (corrupt), RuntimeError (shape / names)
        raise InputError(f"{weights}: cannot load weights into the {info['model_type']} "
                         f"described by {cfg_path.name}: {e}") from None
    return model.to(device).eval(), info

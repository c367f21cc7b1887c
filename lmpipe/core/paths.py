"""Where things live. Every path is under the project root (the DVC repo root)."""

from __future__ import annotations

import os
from pathlib import Path

from lmpipe.core.names import MODEL_STAGE


def project_root() -> Path:
    """The folder holding params.yaml: LMPIPE_ROOT, else the current directory or a parent."""
    env = os.environ.get("LMPIPE_ROOT")
    if env:
        return Path(env).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "params.yaml").exists() or (folder / "dvc.yaml").exists():
            return folder
    return here


def data_dir() -> Path:
    return project_root() / "data"


def corpus_dir() -> Path:
    return data_dir() / "corpus"


def instruct_dir() -> Path:
    return data_dir() / "instruct"


def tokenizer_dir() -> Path:
    return data_dir() / "tokenizer"


def tokens_dir() -> Path:
    return data_dir() / "tokens"


def models_dir() -> Path:
    return data_dir() / "models"


def model_dir(model: str) -> Path:
    """The folder a model is loaded from: data/models/<model>/, the LoRA model's merged
    weights (its adapter lies beside them in data/models/lora/adapter/)."""
    if model not in MODEL_STAGE:
        raise ValueError(f"unknown model {model!r}")
    folder = models_dir() / model
    return folder / "merged" if model == "lora" else folder


def lora_adapter_dir() -> Path:
    """The LoRA stage's PEFT adapter (adapter_config.json + adapter_model.safetensors)."""
    return models_dir() / "lora" / "adapter"


def checkpoints_dir() -> Path:
    return data_dir() / "checkpoints"


def metrics_path(stage: str) -> Path:
    return project_root() / "metrics" / f"{stage}.json"


def plots_dir(stage: str) -> Path:
    return project_root() / "plots" / stage


def reports_dir() -> Path:
    return project_root() / "reports"


def params_stamp() -> Path:
    """The out of the `params` stage that every other stage depends on (see stages/params.py)."""
    return scratch_dir() / "params-checked"


def scratch_dir() -> Path:
    """Git-ignored working space of the stages (downloads, temporary extraction, logs)."""
    return project_root() / ".lmpipe"

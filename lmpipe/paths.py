"""Where things live. Every path is relative to the project root (the DVC repo root)."""

from __future__ import annotations

import os
from pathlib import Path

STAGES = ("download", "tokenizer", "ngram", "rnn", "pretrain", "sft", "lora", "evaluate")


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


def checkpoints_dir() -> Path:
    return data_dir() / "checkpoints"


def metrics_path(stage: str) -> Path:
    return project_root() / "metrics" / f"{stage}.json"


def plots_dir(stage: str) -> Path:
    return project_root() / "plots" / stage

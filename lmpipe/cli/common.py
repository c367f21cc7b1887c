"""What several `lmpipe` verbs share: finding a trained model by name or by its place in the
MLflow model registry, checking the sampling flags before any model loads."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

from lmpipe.core.errors import InputError
from lmpipe.core.names import MODEL_CONFIG_FILE, MODEL_STAGE, MODELS
from lmpipe.core.paths import model_dir

MODELS_NOTE = textwrap.fill("The models are small and quickly trained (the default profile: a 3.5 M-parameter "
               "Transformer, 5 minutes of CPU training on 1 MB of Shakespeare, finetuned on a "
               "few hundred instructions), so expect text in the style of their data, not facts "
               "or correct answers. `lmpipe chat` prints what the loaded model is.", width=88)


def model_folder(name: str, choices: tuple[str, ...] = MODELS) -> Path:
    """The folder `--model NAME` loads from (LoRA: its merged weights); exit 2 naming the
    stage to run when it is not trained yet."""
    if name not in choices:
        raise InputError(f"--model: unknown model {name!r}; choose one of {', '.join(choices)}")
    folder = model_dir(name)
    if not folder.exists() or (name != "ngram" and not (folder / MODEL_CONFIG_FILE).exists()):
        raise InputError(f"model {name!r} not found at {folder}; "
                         f"run `dvc repro {MODEL_STAGE[name]}` first")
    return folder


@dataclass(frozen=True)
class ModelSource:
    """Where `--model` loads from: the weights' folder, and the tokenizer to read them with
    (None: the project's data/tokenizer/)."""

    folder: Path
    tokenizer: Path | None = None


def model_source(name: str, choices: tuple[str, ...] = MODELS) -> ModelSource:
    """`--model`: a model name (data/models/), or a registered model (`models:/NAME@ALIAS`,
    `models:/NAME/VERSION`, an MLflow run id) downloaded and md5-checked against the registry,
    loaded with the tokenizer registered beside it."""
    # deferred: the CLI imports the library only when a verb runs (mlflow itself is deferred
    # further, inside resolve)
    from lmpipe.tracking.registered import is_registry_ref, resolve
    from lmpipe.tracking.registry import REGISTERED

    if not is_registry_ref(name):
        return ModelSource(model_folder(name, choices))

    reg = resolve(name, tuple(m for m in choices if m in REGISTERED))
    return ModelSource(reg.folder, reg.tokenizer)


def check_sampling_args(args) -> None:
    """The sampling flags shared by `generate` and `chat`, checked before any model loads."""
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise InputError(f"--temperature: must be >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise InputError(f"--top-k: must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise InputError(f"--top-p: must be in (0, 1], got {args.top_p}")
    if args.repetition_penalty <= 0:
        raise InputError(f"--repetition-penalty: must be > 0, got {args.repetition_penalty}")


def describe_model(model: str) -> str:
    """What the loaded model is, in one sentence (lmpipe/evaluation/model_card.py)."""
    # deferred: the library, as every verb defers it
    from lmpipe.evaluation.model_card import describe_model as card

    if model not in MODELS:   # a registered model: its run in MLflow holds what it is
        return (f"{model}: a model from the MLflow model registry (a small demonstration "
                "model; its training run in MLflow says what it read and for how long).")
    return card(model)

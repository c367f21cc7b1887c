"""`lmpipe generate --model NAME --prompt TEXT`: print a sample from a trained model."""

from __future__ import annotations

import argparse

from lmpipe.errors import InputError
from lmpipe.paths import models_dir

MODELS = ("ngram", "rnn", "transformer", "sft", "lora")


def register(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="sample text from a trained model",
        description="Sample a continuation of PROMPT from a trained model under data/models/.",
        epilog='example: lmpipe generate --model transformer --prompt "ROMEO:" --max-new-tokens 100 --top-p 0.9',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help=f"one of: {', '.join(MODELS)}")
    p.add_argument("--prompt", default="", help="text to continue (default: empty)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling (neural models)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="neural models")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def model_folder(name: str):
    if name not in MODELS:
        raise InputError(f"--model: unknown model {name!r}; choose one of {', '.join(MODELS)}")
    folder = models_dir() / name
    if not folder.exists():
        stage = {"transformer": "pretrain"}.get(name, name)
        raise InputError(f"model {name!r} not found at {folder}; run `dvc repro {stage}` first")
    return folder


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


def run(args) -> int:
    check_sampling_args(args)
    folder = model_folder(args.model)
    if args.model == "lora":
        folder = folder / "merged"  # the adapter merged into its base: a plain model folder
    if args.model == "ngram":
        from lmpipe.ngram import generate_text

        text = generate_text(
            folder, args.prompt, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_k=args.top_k, seed=args.seed,
        )
    else:
        from lmpipe.sampling import generate_text

        text = generate_text(
            folder, args.prompt, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            repetition_penalty=args.repetition_penalty, seed=args.seed,
        )
    print(text)  # generate_text returns the prompt and its continuation
    return 0

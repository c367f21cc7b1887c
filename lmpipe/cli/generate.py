"""`lmpipe generate --model NAME --prompt TEXT`: print a sample from a trained model."""

from __future__ import annotations

import argparse
import sys
import textwrap

from lmpipe.cli.common import MODELS_NOTE, check_sampling_args, model_source
from lmpipe.cli.text_out import clean_continuation, dropped_note
from lmpipe.core.names import MODELS

EPILOG = """\
examples:
  lmpipe generate --model transformer --prompt "ROMEO:" --max-new-tokens 100 --top-p 0.9
  lmpipe generate --model ngram --prompt "First Citizen:" --temperature 0.8

""" + MODELS_NOTE


def register(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="sample text from a trained model",
        description=textwrap.fill("Sample a continuation of PROMPT from a trained model under data/models/.", width=88),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True,
                   help=f"one of: {', '.join(MODELS)}; or a registered model: "
                   "models:/lmpipe-transformer@champion, models:/NAME/VERSION, an MLflow run id")
    p.add_argument("--prompt", default="", help="text to continue (default: empty)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling (neural models)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="neural models")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args) -> int:
    check_sampling_args(args)
    src = model_source(args.model)
    # deferred: torch and the models take seconds to import, `lmpipe --help` should not
    if args.model == "ngram":
        from lmpipe.ngram.sampling import generate_text

        text = generate_text(
            src.folder, args.prompt, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_k=args.top_k, seed=args.seed,
        )
    else:
        from lmpipe.models.sampling import generate_text

        text = generate_text(
            src.folder, args.prompt, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            repetition_penalty=args.repetition_penalty, seed=args.seed,
            tokenizer_path=src.tokenizer,
        )
    text, dropped = clean_continuation(text, args.prompt)
    print(text)  # generate_text returns the prompt and its continuation
    if dropped:
        print(f"lmpipe generate: {dropped_note(dropped)}", file=sys.stderr)
    return 0

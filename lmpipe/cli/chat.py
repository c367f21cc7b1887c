"""`lmpipe chat --model sft|lora`: talk to an instruction-tuned model, or ask it once (--prompt).

Both modes go through `lmpipe.tokenizer.chat_template` (the template the model was trained on) and the
KV-cached sampler, and stop at the assistant's `<|im_end|>`. The LoRA model answers from its
merged weights (data/models/lora/merged/, equal to base + adapter).
"""

from __future__ import annotations

import argparse
import sys
import textwrap

from lmpipe.cli.common import (
    MODELS_NOTE,
    check_sampling_args,
    describe_model,
    model_source,
)
from lmpipe.cli.text_out import HoldingTokenizer, dropped_note
from lmpipe.core.errors import InputError
from lmpipe.core.names import CHAT_MODELS, DEFAULT_SYSTEM_PROMPT

QUIT = ("/quit", "/exit")
EPILOG = """\
examples:
  lmpipe chat --model lora
  lmpipe chat --model sft --prompt "Give three tips for staying healthy." --temperature 0

""" + MODELS_NOTE
HELP = "commands: /reset forgets the conversation, /quit (or Ctrl-D) leaves"


def register(sub) -> None:
    p = sub.add_parser(
        "chat",
        help="chat with the SFT or LoRA model (interactive, or one answer with --prompt)",
        description=textwrap.fill("Answer prompts with an instruction-tuned model through the chat template "
        "it was trained on. Without --prompt, reads prompts interactively (" + HELP + ").", width=88),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="sft",
                   help=f"one of: {', '.join(CHAT_MODELS)} (default: sft); or a registered "
                   "one: models:/lmpipe-sft@champion, models:/NAME/VERSION, an MLflow run id")
    p.add_argument("--prompt", default=None, help="answer this one prompt and exit")
    p.add_argument("--system", default=None,
                   help="system line (default: the one the model was trained with, recorded "
                   f"in its config.json, else {DEFAULT_SYSTEM_PROMPT!r}; '' for none)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling; 1 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--history", action="store_true",
                   help="interactive: keep earlier exchanges in the prompt (the models were "
                   "trained on single exchanges, so answers are usually better without)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.set_defaults(func=run)


def run(args) -> int:
    # deferred: torch and the models take seconds to import, `lmpipe --help` should not
    import torch

    from lmpipe.models.sampling import generate_reply
    from lmpipe.models.store import load_model
    from lmpipe.tokenizer.model import Tokenizer

    check_sampling_args(args)
    src = model_source(args.model, CHAT_MODELS)
    folder = src.folder
    tok = HoldingTokenizer(Tokenizer.load(src.tokenizer))   # never a U+FFFD for a cut character
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, info = load_model(folder, device=device)
    system = args.system if args.system is not None else info.get("system_prompt", DEFAULT_SYSTEM_PROMPT)
    if model.config.vocab_size != tok.vocab_size:
        raise InputError(f"{folder}: the model has a vocabulary of {model.config.vocab_size}, "
                         f"the tokenizer {tok.vocab_size}; retrain with `dvc repro`")

    def answer(prompt: str, history, turn: int) -> str:
        return generate_reply(
            model, tok, prompt, system=system or None, history=history,
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
            top_p=args.top_p, repetition_penalty=args.repetition_penalty,
            seed=args.seed + turn, device=device)

    if args.prompt is not None:
        print(describe_model(args.model), file=sys.stderr)
        print(answer(args.prompt, (), 0))
        if tok.dropped:
            print(f"lmpipe chat: {dropped_note(tok.dropped)}", file=sys.stderr)
        return 0

    interactive = sys.stdin.isatty()
    if interactive:
        print(f"lmpipe chat ({args.model}, {folder}); {HELP}", file=sys.stderr)
        print(describe_model(args.model), file=sys.stderr)
    history: list[tuple[str, str]] = []
    turn = 0
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text in QUIT:
            break
        if text == "/reset":
            history.clear()
            print("(conversation forgotten)", file=sys.stderr)
            continue
        try:
            reply = answer(text, history if args.history else (), turn)
        except InputError as err:
            print(f"lmpipe chat: {err}", file=sys.stderr)
            continue
        print(f"assistant> {reply}" if interactive else reply, flush=True)
        if args.history:
            history.append((text, reply))
        turn += 1
    return 0

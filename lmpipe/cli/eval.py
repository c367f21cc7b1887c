"""`lmpipe eval --model NAME --text FILE`: perplexity and bits per byte of any UTF-8 text.

The file is scored as one document (its ids, then EOS) by `lmpipe.evaluation.scoring.score_text`,
the code path the `evaluate` stage uses for the test split.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmpipe.cli.common import model_source
from lmpipe.core.errors import InputError
from lmpipe.core.names import MODELS

MIN_TOKENS = 100   # below this many scored tokens, `eval` warns (short_text_warning)


def register(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="score a UTF-8 text file with a trained model (perplexity, bits per byte)",
        description="Score FILE with a trained model under data/models/ and print its "
        "perplexity (per token) and bits per byte (per UTF-8 byte, comparable across "
        "tokenizers). The file is one document: its tokens followed by EOS, the first one "
        "predicted from a document boundary, exactly as the evaluate stage scores a split.",
        epilog="example: lmpipe eval --model transformer --text notes.txt --stride 64",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True,
                   help=f"one of: {', '.join(MODELS)}; or a registered model: "
                   "models:/lmpipe-transformer@champion, models:/NAME/VERSION, an MLflow run id")
    p.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text file to score")
    p.add_argument("--stride", type=int, default=None,
                   help="sliding-window stride for Transformers (default: half the context "
                        "length, as the evaluate stage; the context length = non-overlapping)")
    p.add_argument("--rnn-context", type=int, default=None,
                   help="score the RNN in windows of N tokens (default: carry its state)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="Transformer precision, as evaluate.dtype: auto (default) = bfloat16 "
                        "where the device has it natively, else float32")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=run)


def read_text(path: str) -> str:
    from lmpipe.evaluation.scoring import decode_utf8  # deferred: imports torch

    file = Path(path)
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise InputError(f"--text: {file}: file not found") from None
    except IsADirectoryError:
        raise InputError(f"--text: {file}: is a folder, not a text file") from None
    except OSError as err:
        raise InputError(f"--text: {file}: cannot read ({err.strerror})") from None
    text = decode_utf8(data, f"--text: {file}")
    if not text:
        raise InputError(f"--text: {file}: the file is empty, nothing to score")
    return text


def run(args) -> int:
    from lmpipe.evaluation.scoring import (  # deferred: imports torch
        pick_device,
        score_text,
    )
    from lmpipe.tokenizer.model import (
        Tokenizer,  # deferred: the library, with the above
    )

    for name in ("stride", "rnn_context", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')}: must be >= 1, got {value}")
    src = model_source(args.model)
    text = read_text(args.text)
    tok = Tokenizer.load(src.tokenizer) if src.tokenizer else None
    score = score_text(src.folder, text, tokenizer=tok, device=pick_device(args.device, "--device"),
                       stride=args.stride, batch_size=args.batch_size,
                       rnn_context=args.rnn_context, dtype=args.dtype,
                       progress=sys.stderr.isatty())
    warning = short_text_warning(score.n_tokens, score.n_bytes)
    result = {"model": args.model, "file": str(args.text), "ppl": score.ppl, "bpb": score.bpb,
              "loss": score.loss, "tokens": int(score.n_tokens), "bytes": int(score.n_bytes),
              "tokens_per_second": score.tokens_per_second, "seconds": score.seconds,
              "warning": warning}
    if warning:
        print(f"lmpipe eval: warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(f"model {args.model}: {score.n_tokens} tokens, {score.n_bytes} bytes of {args.text}")
        print(f"perplexity     {score.ppl:.6f}")
        print(f"bits per byte  {score.bpb:.6f}")
        print(f"loss           {score.loss:.6f} nats/token")
        print(f"throughput     {score.tokens_per_second:,.0f} tokens/s")
    return 0


def short_text_warning(n_tokens: int, n_bytes: int) -> str | None:
    """Why a figure from a short text means little, or None.

    Every text is scored as one document: its first token is predicted from a document
    boundary alone, and the EOS after it is predicted too. Over a handful of tokens those two
    dominate (a 3-byte file gave perplexity 312,185), so below MIN_TOKENS the figure is
    printed with a warning rather than as if it described the model."""
    if n_tokens >= MIN_TOKENS:
        return None
    return (f"only {n_tokens} tokens ({n_bytes} bytes) scored: the first token (predicted from "
            f"a document boundary) and the closing EOS dominate so short a text, so this "
            f"perplexity says little about the model; score at least {MIN_TOKENS} tokens "
            f"(a few hundred bytes)")

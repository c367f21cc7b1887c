"""The `lmpipe` command: user-facing verbs, each in its own module of lmpipe/cli/."""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from lmpipe.core.errors import EXIT_BAD_INPUT, EXIT_FAILURE, InputError

# verb -> module in lmpipe.cli exposing `register(subparsers)`; each registered parser
# sets `func(args) -> int` as its default.
COMMANDS = {
    "run": "run",
    "profile": "profile",
    "generate": "generate",
    "chat": "chat",
    "eval": "eval",
    "lineage": "lineage",
    "sync-mlflow": "sync_mlflow",
    "compare": "compare",
    "results": "results",
    "ui": "ui",
    "sweep": "sweep",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmpipe",
        description="lmpipe: corpus -> tokenizer -> n-gram, RNN, Transformer, SFT, LoRA -> evaluation.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS.values():
        importlib.import_module(f"lmpipe.cli.{module}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        return int(args.func(args) or 0)
    except InputError as err:
        print(f"lmpipe {args.command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as err:  # pragma: no cover - the traceback is the useful part
        traceback.print_exc()
        print(f"lmpipe {args.command}: failed: {err}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())

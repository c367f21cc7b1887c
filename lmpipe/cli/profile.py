"""`lmpipe profile NAME`: switch params.yaml to a shipped profile (default, smoke, gpu)."""

from __future__ import annotations

import argparse

from lmpipe.core.files import write_text_atomic
from lmpipe.core.paths import project_root
from lmpipe.core.profiles import available_profiles, dump_params, profile_dict


def register(sub) -> None:
    p = sub.add_parser(
        "profile",
        help="write a shipped profile (default, smoke, gpu) to params.yaml",
        description="Write the full params of a profile to params.yaml. DVC then sees ordinary "
        "params changes, re-runs what they touch and records them in dvc.lock.",
        epilog="example: lmpipe profile smoke && dvc repro",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", help=f"one of: {', '.join(available_profiles())}")
    p.add_argument("--output", default=None, help="file to write (default: params.yaml at the root)")
    p.add_argument("--print", action="store_true", help="print instead of writing")
    p.set_defaults(func=run)


def run(args) -> int:
    text = dump_params(profile_dict(args.name))
    if args.print:
        print(text, end="")
        return 0
    target = args.output or project_root() / "params.yaml"
    write_text_atomic(target, text)
    print(f"wrote profile {args.name!r} to {target}")
    return 0

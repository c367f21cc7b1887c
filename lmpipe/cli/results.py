"""`lmpipe results`: the README's headline table, generated from a run's metrics files."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from lmpipe.core.files import write_text_atomic
from lmpipe.core.git import git, git_state
from lmpipe.core.paths import project_root


def register(sub) -> None:
    p = sub.add_parser(
        "results",
        help="print the headline results table (or write it into README.md) from metrics/",
        description=textwrap.fill("Print each model's size, training time and val/test bits per byte, the "
        "instruction models' response perplexity, and the machine, commit and dvc.lock "
        "that produced them, from metrics/*.json. With --readme, replace the generated block "
        "of README.md with it, so the README's table is always one run's real figures.", width=88),
        epilog="examples:\n  make run && lmpipe results\n  lmpipe results --readme",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--readme", nargs="?", const="README.md", default=None, metavar="FILE",
                   help="rewrite the generated block of FILE (default README.md)")
    p.set_defaults(func=run)


def run(args) -> int:
    # deferred: the library, as every verb defers it
    from lmpipe.evaluation.model_card import replace_block, results_markdown

    root = project_root()
    commit = git_state(root)["git_commit"]
    changed = [line.split(maxsplit=1)[1] for line in git(
        root, "status", "--porcelain", "--untracked-files=no").splitlines() if line.strip()]
    block = results_markdown(root, commit, changed)
    if args.readme:
        path = Path(args.readme)
        write_text_atomic(path, replace_block(path.read_text(encoding="utf-8"), block, str(path)))
        print(f"lmpipe results: wrote the results table into {path}")
    else:
        print(block, end="")
    return 0

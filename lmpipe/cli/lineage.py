"""`lmpipe lineage`: the chain of stages behind an artifact, and a check of the files."""

from __future__ import annotations

import argparse
import json
import sys

from lmpipe.core.errors import InputError
from lmpipe.core.paths import project_root

EPILOG = """\
examples:
  lmpipe lineage transformer              # a model name: ngram, rnn, transformer, sft, lora
  lmpipe lineage data/tokens/train/part-00000.bin   # any file or folder DVC produced
  lmpipe lineage 3f2a...c9 --json         # an MLflow run id (a stage run or a pipeline run)
  lmpipe lineage --verify                 # re-hash outs; non-zero exit naming every mismatch
"""


def register(sub) -> None:
    p = sub.add_parser(
        "lineage",
        help="show the stages, inputs, params and runs that produced an artifact",
        description="Print the chain that produced TARGET from dvc.lock: each upstream stage "
        "with its command, the md5 of its deps and outs, its params, the git commit and the "
        "MLflow run ids, down to the source checksums. --verify asks DVC to re-hash every out "
        "and reports files that no longer match dvc.lock.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", nargs="?", help="a path under data/, a model name or an MLflow run id")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--verify", action="store_true",
                   help="re-hash the outs on disk against dvc.lock; exit 1 on any mismatch")
    p.add_argument("--no-mlflow", action="store_true", help="do not look up MLflow runs")
    p.set_defaults(func=run)


def run(args) -> int:
    from lmpipe.tracking.lineage import (  # deferred: mlflow
        lineage,
        render,
        render_verify,
        verify,
    )

    root = project_root()
    if args.verify:
        report = verify(root)
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            out = sys.stdout if report["ok"] else sys.stderr
            print(render_verify(report), end="", file=out)
        return 0 if report["ok"] else 1
    if not args.target:
        raise InputError("give a TARGET (path, model name or MLflow run id) or --verify")
    report = lineage(root, args.target, with_mlflow=not args.no_mlflow)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(render(report), end="")
    return 0

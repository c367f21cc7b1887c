"""`lmpipe compare A B`: two runs of the pipeline, what differs between them and by how much."""

from __future__ import annotations

import argparse
import json
import re
import textwrap
from pathlib import Path

from lmpipe.core.paths import project_root, scratch_dir

EPILOG = """\
examples:
  dvc exp run -n baseline                  # the baseline: params.yaml as it is
  dvc exp run -n order5 -S ngram.order=5   # one param changed
  lmpipe compare baseline order5           # params that differ, metric deltas, loss curves
  lmpipe compare HEAD workspace            # the last commit against the files now
  lmpipe compare 3f2a...e1 9bc0...77       # two MLflow pipeline runs (their run ids)
  lmpipe compare bd089810 d8dc8f16         # the same by their first 8+ digits
  lmpipe compare baseline order5 --json    # the same as JSON

A and B are DVC experiment names, git revisions, `workspace`, or MLflow run ids (whole or
their first 8+ digits). The figure
(both runs' loss curves; corpus pretraining and instruction finetuning on separate axes) is
written to .lmpipe/compare/A-vs-B.png unless --png says otherwise.
"""


def register(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="compare two runs: params that differ, metric deltas per model, loss curves",
        description=textwrap.fill("Compare two runs of the pipeline: the params that differ, each model's "
        "val and test bits per byte (then its other figures) with the change, the other "
        "metrics that differ, and a PNG overlaying both runs' loss curves.", width=88),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("a", metavar="A", help="the reference run (its figures are the `A` column)")
    p.add_argument("b", metavar="B", help="the run compared with it (`B - A` is the change)")
    p.add_argument("--png", default=None, help="where to write the loss-curve figure")
    p.add_argument("--wall-clock", action="store_true",
                   help="also list timings and memory (they differ between any two runs)")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    p.set_defaults(func=run)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:60]


def run(args) -> int:
    # deferred: matplotlib and the readers load in a second, `lmpipe --help` should not
    from lmpipe.evaluation.plots import plot_runs_loss_curves
    from lmpipe.tracking.compare import compare, format_comparison, resolve

    root = project_root()
    a, b = resolve(root, args.a), resolve(root, args.b)
    result = compare(a, b, wall_clock=args.wall_clock)
    png = Path(args.png) if args.png else scratch_dir() / "compare" / f"{_slug(a.name)}-vs-{_slug(b.name)}.png"
    figure = None
    if a.curves or b.curves:
        png.parent.mkdir(parents=True, exist_ok=True)
        figure = plot_runs_loss_curves({f"A {a.name}": a.curves, f"B {b.name}": b.curves}, png,
                                       f"loss curves: A = {a.name} (solid), B = {b.name} (dashed)")
    if args.json:
        print(json.dumps({**result, "figure": str(figure) if figure else None}, indent=2))
    else:
        print(format_comparison(result, figure))
    return 0

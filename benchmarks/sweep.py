"""Wall time of a 4-point sweep with 1 and with 2 local workers, in one run (prints a table).

    python benchmarks/sweep.py                    # the smoke profile, the README's grid
    python benchmarks/sweep.py --workers 1,2,4 --json out.json

For each worker count, a fresh scratch copy of this project on the profile (git + DVC, its
own MLflow store and Prefect home) runs

    lmpipe sweep -S pretrain.train.lr=0.003,0.006 -S pretrain.model.n_layer=1,2 --local N

end to end: the temporary Prefect server and N workers starting, the base (download,
tokenizer, ngram, rnn once), the 4 points (pretrain, sft, lora, evaluate each) and the
report. The table gives the whole command's wall time, and the points' part alone (from
the first point submitted to the last one finished, read from the sweep's output), with the
1-minute load average before and after each run: on a shared machine the ratio means little
unless the load stayed put. Needs the offline mirror (LMPIPE_MIRROR) like the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lmpipe.core.machine import cpu_model  # noqa: E402
from tests.helpers.repo import make_repo  # noqa: E402

GRID = ["-S", "pretrain.train.lr=0.003,0.006", "-S", "pretrain.model.n_layer=1,2"]


def one_sweep(workers: int, profile: str, mirror: Path, keep: bool) -> dict:
    root = Path(tempfile.mkdtemp(prefix=f"lmpipe-bench-sweep-{workers}-"))
    env = make_repo(root, mirror, profile)
    env.pop("PREFECT_API_URL", None)
    env["PREFECT_HOME"] = str(root / ".prefect")
    load0 = os.getloadavg()[0]
    started = time.monotonic()
    stamps: dict[str, float] = {}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "lmpipe"), "sweep", *GRID,
                             "--name", f"bench{workers}", "--local", str(workers)],
                            cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    output = []
    for line in proc.stdout:
        output.append(line)
        now = time.monotonic() - started
        if re.search(r"point\(s\) submitted", line):
            stamps["points_from"] = now
        if re.search(r"bench\d+-\d+: completed", line):
            stamps["points_to"] = now
    code = proc.wait()
    seconds = time.monotonic() - started
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
    return {"workers": workers, "exit": code, "seconds": round(seconds, 1),
            "points_seconds": round(stamps.get("points_to", 0) - stamps.get("points_from", 0), 1),
            "load_before": round(load0, 2), "load_after": round(os.getloadavg()[0], 2),
            "tail": "".join(output[-15:]) if code else ""}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the scratch projects")
    args = ap.parse_args(argv)
    mirror = Path(os.environ.get("LMPIPE_MIRROR") or REPO.parent / "shared" / "data").resolve()
    results = [one_sweep(int(n), args.profile, mirror, args.keep)
               for n in args.workers.split(",")]
    print(f"\nlmpipe sweep, 4 points, profile {args.profile}; CPU {cpu_model()}, "
          f"{os.cpu_count()} cores")
    print("| local workers | exit | wall s (whole command) | points s | load before | after |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['workers']} | {r['exit']} | {r['seconds']} | {r['points_seconds']} | "
              f"{r['load_before']} | {r['load_after']} |")
    base = results[0]
    for r in results[1:]:
        if r["points_seconds"] and base["points_seconds"]:
            print(f"{r['workers']} workers vs {base['workers']}: points "
                  f"{base['points_seconds'] / r['points_seconds']:.2f}x faster, whole command "
                  f"{base['seconds'] / r['seconds']:.2f}x")
    for r in results:
        if r["exit"]:
            print(f"--- {r['workers']} workers exited {r['exit']}:\n{r['tail']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if all(r["exit"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

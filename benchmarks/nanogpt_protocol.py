"""The nanoGPT protocol on TinyShakespeare: train the default Transformer, score the last 10%.

    python benchmarks/nanogpt_protocol.py                 # the default profile
    python benchmarks/nanogpt_protocol.py --profile smoke # any shipped profile (a quick check)
    python benchmarks/nanogpt_protocol.py --keep /tmp/np  # keep the scratch project (in a new, empty folder)

nanoGPT's character-level Shakespeare trains on the first 90% of the text and reports the
loss on the last 10% (val). The same protocol here: the pipeline's own stages run exactly as
DVC runs them (`python -m stages.<name>` with LMPIPE_ROOT on a scratch project and
LMPIPE_PARAMS on the profile's params): `download` (whose default split puts the first 90%
of the text, cut at a line boundary, in train), `tokenizer` (trained on train) and `pretrain`;
then `lmpipe eval --text` scores the LAST 10% of the file's bytes
(`data[int(0.9 * len(data)):]`, i.e. val and test together) as one document. Its bits per
byte times ln 2 are nats per byte, nanoGPT's unit for its ASCII text (nanoGPT's A100 model:
1.4697; the target here is <= 1.45 with <= 5 minutes of training on the reference 2-core
machine).

Prints nats per byte in non-overlapping windows of the context (nanoGPT's own figure averages
the loss over whole windows, so the target is judged on this one) and in windows sliding by
half the context (the evaluate stage's and the CLI's default), training seconds, tokens seen,
the published (best-validation) step and the machine with its load before and after. Needs
the offline mirror (LMPIPE_MIRROR) or internet.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from lmpipe.core.machine import cpu_model

REPO = Path(__file__).resolve().parent.parent
STAGES = ("download", "tokenizer", "pretrain")
TARGET = 1.45


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def env_for(root: Path, params_file: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
               LMPIPE_ROOT=str(root), LMPIPE_PARAMS=str(params_file), LMPIPE_TRACKING="off",
               OMP_WAIT_POLICY=env.get("OMP_WAIT_POLICY", "PASSIVE"))
    return env


def run(cmd: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def eval_last10(text_file: Path, stride: int | None, env: dict, root: Path) -> dict:
    cmd = [sys.executable, "-m", "lmpipe.cli", "eval", "--model", "transformer", "--text",
           str(text_file), "--json"]
    if stride:
        cmd += ["--stride", str(stride)]
    return json.loads(run(cmd, env, root).stdout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="default", help="a shipped profile (default: default)")
    ap.add_argument("--keep", type=Path, default=None, help="scratch project folder to keep")
    args = ap.parse_args(argv)

    if args.keep is not None and args.keep.exists() and any(args.keep.iterdir()):
        # a kept project's stages would resume from its checkpoints: the "training seconds"
        # printed would be the earlier run's, of whatever code trained it then
        print(f"--keep: {args.keep} is not empty; its stages would resume from the earlier "
              "run's checkpoints and report that run's figures. Give a new folder or remove "
              "it.", file=sys.stderr)
        return 2
    root = args.keep or Path(tempfile.mkdtemp(prefix="nanogpt-protocol-"))
    root.mkdir(parents=True, exist_ok=True)
    params_file = root / "params.yaml"
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")   # marks the project root
    out = subprocess.run([sys.executable, "-m", "lmpipe.cli", "profile", args.profile,
                          "--output", str(params_file)], cwd=REPO,
                         env=env_for(root, params_file), capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(out.stderr)
    params = yaml.safe_load(params_file.read_text())
    env = env_for(root, params_file)
    load_before = load()
    seconds = {}
    for stage in STAGES:
        t0 = time.perf_counter()
        run([sys.executable, "-m", f"stages.{stage}"], env, REPO)
        seconds[stage] = time.perf_counter() - t0
    load_after = load()

    source = json.loads((root / "data" / "corpus" / "source.json").read_text())
    raw_name = source["inputs"][0]["name"]
    raw = next(p for p in (Path(os.environ.get("LMPIPE_MIRROR", "")) / Path(raw_name).name,
                           root / ".lmpipe" / "cache" / "downloads" / raw_name) if p.is_file())
    data = raw.read_bytes()
    last10 = root / "last10.txt"
    last10.write_bytes(data[int(0.9 * len(data)):])
    pretrain = json.loads((root / "metrics" / "pretrain.json").read_text())
    context = params["pretrain"]["model"]["context_length"]
    windows = eval_last10(last10, context, env, root)
    sliding = eval_last10(last10, max(1, context // 2), env, root)

    ln2 = math.log(2.0)
    nats, nats_sliding = windows["bpb"] * ln2, sliding["bpb"] * ln2
    rows = [
        ("machine", f"{cpu_model()}, {os.cpu_count()} cores; load {load_before} -> {load_after}"),
        ("profile", f"{args.profile} (pretrain budget: max_tokens "
                    f"{params['pretrain']['train']['max_tokens']}, max_steps "
                    f"{params['pretrain']['train']['max_steps']}; select "
                    f"{params['pretrain']['train'].get('select', 'last')})"),
        ("scored text", f"last 10% of {raw.name}: {windows['bytes']:,} bytes, "
                        f"{windows['tokens']:,} tokens"),
        ("nats/byte, windows of the context", f"{nats:.4f}  (target <= {TARGET}: "
                                              f"{'met' if nats <= TARGET else 'NOT met'})"),
        (f"nats/byte, sliding stride {max(1, context // 2)}", f"{nats_sliding:.4f}"),
        ("training seconds", f"{pretrain['train_seconds']:.1f} (stage wall time "
                             f"{seconds['pretrain']:.1f} s)"),
        ("tokens seen", f"{pretrain['tokens_seen']:,} ({pretrain['epochs']} epochs)"),
        ("stopped by", str(pretrain.get("stopped_by"))),
        ("published step", f"{pretrain.get('selected_step')} of {pretrain['steps']} "
                           f"(best val loss {pretrain.get('best_val_loss')})"),
        ("temperature", f"{pretrain.get('temperature')} (fitted on val after training, as the "
                        "published step was chosen on val; val is half of the scored text)"),
        ("params", f"{pretrain['params']:,}"),
    ]
    width = max(len(k) for k, _ in rows)
    print("nanoGPT protocol: train on the first 90%, score the last 10% of TinyShakespeare")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    print(f"  (scratch project: {root})")
    return 0 if nats <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())

"""Sweep the default profile's settings and print the model-family table (issue 12).

    python benchmarks/sweep_default.py                       # the built-in default grid
    python benchmarks/sweep_default.py --grid pretrain.model.dropout=0.1,0.2 \\
        --grid pretrain.train.weight_decay=0.1,0.3 --fixed pretrain.train.max_tokens=600000
    python benchmarks/sweep_default.py --models ngram,rnn --grid tokenizer.vocab_size=512,1024
    python benchmarks/sweep_default.py --table-only          # reprint from what is on disk

Every grid point is the default profile (``lmpipe profile default --print``) with the
``--fixed`` values, then the point's values, set by dotted key (values are YAML: ``null``,
``0.1``, ``lstm``). The stages run as subprocesses, exactly as DVC runs them:
``python -m stages.<name>`` with ``LMPIPE_ROOT`` (the run's folder) and ``LMPIPE_PARAMS``
(its params file), so the script depends on the stage names and the metrics files only, not
on the library's internals.

What is shared (each is run once and reused by every grid point, and by a later sweep with
the same settings, so an interrupted sweep resumes where it stopped):
  * ``<root>/data-<hash>``:  download + tokenizer, per (download, tokenizer) section;
  * ``<root>/ngram-<hash>``: the n-gram, per (download, tokenizer, ngram) section;
  * ``<root>/rnn-<hash>``, ``<root>/pretrain-<hash>``: one training run per (data settings,
    its own section, seed). A grid over ``pretrain.*`` trains the RNN once.
Each run folder sees the data folder's corpus, tokenizer and tokens through symlinks.

Scores (all in the evaluate stage's convention, via ``python -m lmpipe.cli eval --json``):
  * val and test bits per byte of every model (the split's text as one document; the
    Transformer in windows sliding by half its context, the RNN carrying its state);
  * the "nanoGPT protocol": nats per byte on the LAST 10% of the corpus's characters
    (``text[int(0.9 * len(text)):]``, nanoGPT's val split; = val + test here), for the
    Transformer both in windows sliding by half its context (``lt10``) and with sliding windows
    of stride ``--stride`` (``lt10s``), and for the RNN and the n-gram.
Runs scored before the evaluate stage's default became half the context (d5b1385) hold
non-overlapping figures in ``val_bpb``/``test_bpb``/``lt10``: ``--rescore`` scores them again.
Training seconds are the stage's own ``train_seconds``; the 1-minute load average before each
training is recorded next to it (the machine is shared: timings are noisy).

Targets checked per row (issue 12): T < R < N on val and test bpb, T <= 0.93 N and
R <= 0.98 N on both splits, Transformer nats/byte on the last 10% <= 1.45 (``ok`` column:
``o``rder, ``t`` ratio T, ``r`` ratio R, ``n`` nanoGPT protocol; ``-`` where missed).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from lmpipe.data.corpus import iter_texts  # the corpus splits as `download` writes them

REPO = Path(__file__).resolve().parent.parent
LN2 = math.log(2.0)
MODEL_STAGE = {"ngram": "ngram", "rnn": "rnn", "transformer": "pretrain"}
SECTION = {"ngram": "ngram", "rnn": "rnn", "transformer": "pretrain"}
LAST10 = "last10.txt"
RESCORE = False                   # --rescore: score finished runs again (new figures)
LAST_CPU: dict[str, float] = {}   # CPU seconds (user + sys) of the last run of each stage

# The built-in grid: the choices the default profile made (README, "Why these defaults").
# Runs are cached per section, so this product trains 3 RNNs and 6 Transformers, not 18 each.
DEFAULT_GRID: dict[str, list[Any]] = {
    "rnn.model.cell": ["rnn", "gru", "lstm"],
    "pretrain.model.qk_norm": [False, True],
    "pretrain.model.dropout": [0.0, 0.1, 0.2],
}
DEFAULT_FIXED: dict[str, Any] = {}


# ----------------------------------------------------------------------------- params
def parse_assign(text: str) -> tuple[str, list[Any]]:
    if "=" not in text:
        raise SystemExit(f"expected KEY=V1,V2,..., got {text!r}")
    key, values = text.split("=", 1)
    return key.strip(), [yaml.safe_load(v) for v in values.split(",")]


def set_key(params: dict, dotted: str, value: Any) -> None:
    node = params
    parts = dotted.split(".")
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            raise SystemExit(f"unknown params key {dotted!r} (no section {p!r})")
        node = node[p]
    if parts[-1] not in node:
        raise SystemExit(f"unknown params key {dotted!r}")
    node[parts[-1]] = value


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def base_params(profile: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "lmpipe.cli", "profile", profile, "--print"],
                         cwd=REPO, env=env_for(REPO), check=True, capture_output=True, text=True)
    return yaml.safe_load(out.stdout)


def env_for(root: Path, params_file: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["LMPIPE_ROOT"] = str(root)
    env.setdefault("LMPIPE_TRACKING", "off")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if params_file is not None:
        env["LMPIPE_PARAMS"] = str(params_file)
    return env


# ----------------------------------------------------------------------------- running
def run_stage(stage: str, root: Path, params: dict, log: Path) -> float:
    """`python -m stages.<stage>` in `root`; returns its wall seconds. Raises on failure.

    The stage's output goes to `root/<stage>.log` (progress bars off); one summary line per
    stage goes to the sweep's `log`."""
    root.mkdir(parents=True, exist_ok=True)
    params = copy.deepcopy(params)
    for section in ("rnn", "pretrain"):
        params[section]["train"]["progress"] = False
    pfile = root / "params.yaml"
    pfile.write_text(yaml.safe_dump(params, sort_keys=False))
    stage_log = root / f"{stage}.log"
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(stage_log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=REPO,
                              env=env_for(root, pfile), stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    LAST_CPU[stage] = cpu
    with open(log, "a") as f:
        f.write(f"{time.strftime('%H:%M:%S')} {stage} in {root.name}: exit {proc.returncode}, "
                f"{wall:.1f} s wall, {cpu:.1f} s CPU, load {load:.2f} -> "
                f"{os.getloadavg()[0]:.2f}\n")
    if proc.returncode != 0:
        tail = "".join(stage_log.read_text().splitlines(True)[-15:])
        raise RuntimeError(f"stage {stage} in {root} exited {proc.returncode}:\n{tail}")
    return wall


def link_data(run_root: Path, data_root: Path) -> None:
    (run_root / "data").mkdir(parents=True, exist_ok=True)
    for sub in ("corpus", "tokenizer", "tokens", "instruct"):
        link = run_root / "data" / sub
        if not link.exists():
            link.symlink_to(data_root / "data" / sub, target_is_directory=True)


def score(root: Path, model: str, text: Path, stride: int | None = None) -> dict:
    cmd = [sys.executable, "-m", "lmpipe.cli", "eval", "--model", model, "--text", str(text),
           "--json", "--device", "cpu"]
    if stride:
        cmd += ["--stride", str(stride)]
    out = subprocess.run(cmd, cwd=root, env=env_for(root), capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"lmpipe eval {model} {text.name} in {root}: {out.stderr[-2000:]}")
    return json.loads(out.stdout)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def prepare_data(root: Path, params: dict, log: Path) -> Path:
    key = digest({"download": params["download"], "tokenizer": params["tokenizer"]})
    data_root = root / f"data-{key}"
    done = data_root / "sweep-done.json"
    if not done.exists():
        for stage in ("download", "tokenizer"):
            run_stage(stage, data_root, params, log)
        texts = {s: "".join(iter_texts(data_root / "data" / "corpus" / s))
                 for s in ("train", "val", "test")}
        for s in ("val", "test"):
            (data_root / f"{s}.txt").write_text(texts[s], encoding="utf-8")
        full = texts["train"] + texts["val"] + texts["test"]
        (data_root / LAST10).write_text(full[int(0.9 * len(full)):], encoding="utf-8")
        done.write_text(json.dumps({"download": params["download"],
                                    "tokenizer": params["tokenizer"]}, indent=1))
    return data_root


def score_run(res: dict, run_root: Path, data_root: Path, model: str, stride: int) -> dict:
    """Val/test bpb and last-10% nats/byte of a trained model (and sliding-window variants
    for the Transformer: `*_s` keys), into `res`."""
    for split in ("val", "test"):
        res[f"{split}_bpb"] = score(run_root, model, data_root / f"{split}.txt")["bpb"]
    res["lt10"] = score(run_root, model, data_root / LAST10)["bpb"] * LN2
    if model == "transformer" and stride:
        for split in ("val", "test"):
            res[f"{split}_bpb_s"] = score(run_root, model, data_root / f"{split}.txt",
                                          stride=stride)["bpb"]
        res["lt10s"] = score(run_root, model, data_root / LAST10, stride=stride)["bpb"] * LN2
        res["stride"] = stride
    res["stride_scored"] = stride
    return res


def model_run(root: Path, data_root: Path, model: str, params: dict, stride: int,
              log: Path, retrain: bool = False) -> dict:
    """Train (or reuse) one model and score it; returns its row of results."""
    section = SECTION[model]
    key = digest({"data": data_root.name, section: params[section], "seed": params["seed"]})
    run_root = root / f"{section}-{key}"
    done = run_root / "sweep-result.json"
    if done.exists() and not retrain:
        res = read_json(done)
        if RESCORE:
            score_run(res, run_root, data_root, model, stride)
            done.write_text(json.dumps(res, indent=1))
        return res
    link_data(run_root, data_root)
    load_before = os.getloadavg()[0]
    wall = run_stage(MODEL_STAGE[model], run_root, params, log)
    load_after = os.getloadavg()[0]
    metrics = read_json(run_root / "metrics" / f"{MODEL_STAGE[model]}.json")
    res: dict[str, Any] = {"model": model, "run": run_root.name, "params": params[section],
                           "seed": params["seed"], "stage_wall_s": round(wall, 1),
                           "stage_cpu_s": round(LAST_CPU.get(MODEL_STAGE[model], 0.0), 1),
                           "load_before": round(load_before, 2),
                           "load_after": round(load_after, 2), "stage_metrics": metrics}
    score_run(res, run_root, data_root, model, stride)
    done.write_text(json.dumps(res, indent=1))
    # The resumable checkpoints are not needed once the run is scored.
    for d in sorted((run_root / "data" / "checkpoints").glob("*/step-*"), reverse=True):
        subprocess.run(["rm", "-rf", str(d)], check=False)
    return res


# ----------------------------------------------------------------------------- the table
def short_names(keys: list[str]) -> dict[str, str]:
    out = {}
    for k in keys:
        parts = k.split(".")
        name = parts[-1]
        if sum(1 for j in keys if j.split(".")[-1] == name) > 1:
            name = f"{parts[0][:2]}.{name}"
        out[k] = {"dropout": "drop", "weight_decay": "wd", "vocab_size": "vocab",
                  "max_tokens": "tokens", "context_length": "ctx", "batch_size": "bs",
                  "n_layer": "L", "d_model": "d", "n_head": "H", "d_hidden": "dh",
                  "d_embed": "de", "eval_every": "ev"}.get(name, name)
    return out


def fmt(v: Any, width: int = 6, digits: int = 3) -> str:
    if v is None:
        return "-".rjust(width)
    if isinstance(v, float):
        return f"{v:.{digits}f}".rjust(width)
    return str(v).rjust(width)


def row_figures(r: dict) -> dict:
    n, rn, t = r.get("ngram"), r.get("rnn"), r.get("transformer")
    f: dict[str, Any] = {}
    for name, m in (("N", n), ("R", rn), ("T", t)):
        for s in ("val", "test"):
            f[f"{name}{s}"] = m[f"{s}_bpb"] if m else None
    for name in ("T", "R"):
        for s in ("val", "test"):
            a, b = f[f"{name}{s}"], f[f"N{s}"]
            f[f"{name}/N{s}"] = a / b if a is not None and b else None
    for s in ("val", "test"):
        f[f"T{s}s"] = t.get(f"{s}_bpb_s") if t else None
    f["lt10"] = t.get("lt10") if t else None
    f["lt10s"] = t.get("lt10s") if t else None
    f["Rlt10"] = rn.get("lt10") if rn else None
    f["Nlt10"] = n.get("lt10") if n else None
    for name, m in (("T", t), ("R", rn)):
        sm = m.get("stage_metrics", {}) if m else {}
        f[f"{name}sec"] = sm.get("train_seconds")
        f[f"{name}cpu"] = m.get("stage_cpu_s") if m else None
        f[f"{name}tok"] = sm.get("tokens_seen")
        f[f"{name}best"] = (f"{sm.get('best_step')}/{sm.get('steps')}"
                            if sm.get("steps") is not None else None)
        f[f"{name}load"] = m.get("load_before") if m else None
        f[f"{name}params"] = sm.get("params")
    ok = ""
    if None not in (f["Tval"], f["Rval"], f["Nval"], f["Ttest"], f["Rtest"], f["Ntest"]):
        ok += "o" if all(f[f"T{s}"] < f[f"R{s}"] < f[f"N{s}"] for s in ("val", "test")) else "-"
        ok += "t" if max(f["T/Nval"], f["T/Ntest"]) <= 0.93 else "-"
        ok += "r" if max(f["R/Nval"], f["R/Ntest"]) <= 0.98 else "-"
    if f["lt10"] is not None:
        ok += "n" if min(f["lt10"], f["lt10s"] or 9) <= 1.45 else "-"
    f["ok"] = ok
    return f


COLUMNS = [("Nval", 6), ("Ntest", 6), ("Rval", 6), ("Rtest", 6), ("Tval", 6), ("Ttest", 6),
           ("Tvals", 6), ("Ttests", 6),
           ("T/Nval", 6), ("T/Ntest", 7), ("R/Nval", 6), ("R/Ntest", 7), ("lt10", 6),
           ("lt10s", 6), ("Rlt10", 6), ("Nlt10", 6), ("Tsec", 5), ("Tcpu", 5), ("Ttok", 8), ("Tbest", 9),
           ("Tload", 5), ("Rsec", 5), ("Rtok", 8), ("Rbest", 9), ("Rload", 5), ("ok", 4)]


def print_table(rows: list[dict], varied: list[str], out=sys.stdout) -> None:
    names = short_names(varied)
    head = [names[k].rjust(max(6, len(names[k]))) for k in varied]
    head += [c.rjust(w) for c, w in COLUMNS]
    print(" ".join(head), file=out)
    for r in rows:
        f = row_figures(r)
        cells = [fmt(r["point"].get(k), max(6, len(names[k])), 3) for k in varied]
        for c, w in COLUMNS:
            v = f.get(c)
            digits = 0 if c.endswith("sec") or c.endswith("load") and False else 3
            if c.endswith("sec") or c.endswith("cpu"):
                cells.append(fmt(None if v is None else round(v), w))
            elif c.endswith("load"):
                cells.append(fmt(v, w, 1))
            elif c.endswith("tok"):
                cells.append(fmt(v, w))
            else:
                cells.append(fmt(v, w, digits))
        print(" ".join(cells), file=out)
    print("bpb = bits per UTF-8 byte (val/test split as one document; T: windows sliding by "
          "half its context, R: state carried; Tvals/Ttests: T with sliding windows of "
          "stride --stride); lt10 = Transformer nats/byte on the last "
          "10% of the corpus (windows sliding by half the context), lt10s = the same with "
          "stride --stride; "
          "Tsec/Rsec = training seconds here (wall); Tcpu = CPU seconds of the whole pretrain stage "
          "process (user+sys: less sensitive to other users' load than wall); Tbest = published step / steps; Tload = "
          "1-min load average before training. ok: o order T<R<N, t T<=0.93N, r R<=0.98N, "
          "n lt10<=1.45 (both splits; '-' = missed)", file=out)


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root",
                    default=os.environ.get("SWEEP_ROOT", str(REPO / ".lmpipe" / "sweep-default")),
                    help="folder of the shared data and the runs (default: .lmpipe/sweep-default)")
    ap.add_argument("--profile", default="default")
    ap.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                    help="a swept params key (repeatable; the grid is their product)")
    ap.add_argument("--fixed", action="append", default=[], metavar="KEY=V",
                    help="a params value for every point (repeatable)")
    ap.add_argument("--points", default=None, metavar="FILE",
                    help="a YAML/JSON list of {key: value} points instead of a product grid")
    ap.add_argument("--models", default="ngram,rnn,transformer",
                    help="which models to train and score (comma separated)")
    ap.add_argument("--stride", type=int, default=64,
                    help="sliding-window stride for the Transformer's last-10%% figure (0: off)")
    ap.add_argument("--retrain", action="store_true", help="ignore finished runs on disk")
    ap.add_argument("--table-only", action="store_true", help="train nothing: reprint")
    ap.add_argument("--rescore", action="store_true",
                    help="score finished runs again (e.g. after a new --stride), no training")
    ap.add_argument("--json", default=None, help="also write every row to this JSON file")
    args = ap.parse_args(argv)

    global RESCORE
    RESCORE = args.rescore
    root = Path(args.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    log = root / "sweep.log"
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in MODEL_STAGE:
            raise SystemExit(f"--models: unknown model {m!r}")

    if args.points:
        points = yaml.safe_load(Path(args.points).read_text())
        varied = list(dict.fromkeys(k for p in points for k in p))
    else:
        grid = dict(parse_assign(g) for g in args.grid) if args.grid else DEFAULT_GRID
        fixed_default = {} if args.grid else DEFAULT_FIXED
        varied = list(grid)
        points = [dict(zip(varied, combo)) for combo in itertools.product(*grid.values())]
        args.fixed = [f"{k}={v}" for k, v in fixed_default.items()] + args.fixed
    fixed = {}
    for f in args.fixed:
        k, v = parse_assign(f)
        fixed[k] = v[0]

    base = base_params(args.profile)
    rows = []
    for i, point in enumerate(points):
        params = copy.deepcopy(base)
        for k, v in {**fixed, **point}.items():
            set_key(params, k, v)
        params["data"]["mirror"] = params["data"].get("mirror") or os.environ.get("LMPIPE_MIRROR")
        row: dict[str, Any] = {"point": point, "fixed": fixed}
        label = ", ".join(f"{k}={v}" for k, v in point.items())
        print(f"[{i + 1}/{len(points)}] {label}", file=sys.stderr, flush=True)
        try:
            data_root = prepare_data(root, params, log) if not args.table_only else None
            if data_root is None:
                key = digest({"download": params["download"], "tokenizer": params["tokenizer"]})
                data_root = root / f"data-{key}"
            for m in models:
                if m == "ngram":
                    key = digest({"data": data_root.name, "ngram": params["ngram"]})
                    nroot = root / f"ngram-{key}"
                    done = nroot / "sweep-result.json"
                    if not done.exists() and not args.table_only:
                        link_data(nroot, data_root)
                        run_stage("ngram", nroot, params, log)
                        res = {"model": "ngram", "run": nroot.name, "params": params["ngram"],
                               "stage_metrics": read_json(nroot / "metrics" / "ngram.json")}
                        for s in ("val", "test"):
                            res[f"{s}_bpb"] = score(nroot, "ngram", data_root / f"{s}.txt")["bpb"]
                        res["lt10"] = score(nroot, "ngram", data_root / LAST10)["bpb"] * LN2
                        done.write_text(json.dumps(res, indent=1))
                    row[m] = read_json(done) or None
                elif args.table_only:
                    key = digest({"data": data_root.name, SECTION[m]: params[SECTION[m]],
                                  "seed": params["seed"]})
                    row[m] = read_json(root / f"{SECTION[m]}-{key}" / "sweep-result.json") or None
                else:
                    row[m] = model_run(root, data_root, m, params, args.stride, log,
                                       retrain=args.retrain)
        except RuntimeError as err:
            print(f"  failed: {err}", file=sys.stderr)
            row["error"] = str(err)
        rows.append(row)
        f = row_figures(row)
        print("  " + " ".join(f"{c}={fmt(f.get(c), 0)}" for c, _ in COLUMNS
                              if f.get(c) is not None), file=sys.stderr, flush=True)
    print(f"load average now: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"runs under {root}")
    print_table(rows, varied)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

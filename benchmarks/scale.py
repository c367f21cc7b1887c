"""download -> tokenizer -> ngram on a large corpus, with wall time, rate and peak RSS per stage.

    python benchmarks/scale.py                       # the 1 GB corpus of benchmarks/corpus.py
    python benchmarks/scale.py --mb 50               # a quick run on 50 MB
    python benchmarks/scale.py --source hf           # the same corpus as Parquet through `hf`

The corpus (benchmarks/corpus.py, seeded) is built once under --work and reused. Each stage
runs as `python -m stages.<name>` in a scratch project under --work (tracking off), exactly
as `dvc repro` would run it, while this script samples the resident memory of the stage's
whole process tree (the tokenizer's encoding workers included) every 0.2 s. Reported:

* download: MB of text per second, peak RSS (target: under 1 GB for 1 GB of text);
* tokenizer: encoding MB/s against sentencepiece's own batch encode (lines, the same thread
  count) measured on the same text right after the stage (target: >= 80%), training time on
  its sample, peak RSS of the process tree (target: <= 2 GB);
* ngram: estimation tokens/s (wall, and per CPU-second of all threads), the peak RSS of
  estimation and of the whole stage (scoring memory-maps the model, whose pages then count
  as resident), and whether counts spilled to disk (targets: order 5 on >= 100M tokens
  within 4 GB, >= 1M tokens/s on 2 cores).

The machine may be shared: the CPU model and the load average around every stage are
printed with its figures, and --json keeps everything.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.corpus import SEPARATOR, generate, mirror  # noqa: E402
from lmpipe.core.machine import cpu_model  # noqa: E402


def corpus(work: Path, mb: float, seed: int) -> Path:
    folder = work / f"corpus-{mb:g}MB-seed{seed}"
    manifest = folder / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text()).get("mb") == mb:
        return folder
    print(f"scale: building the {mb:g} MB corpus (seed {seed}) in {folder}", flush=True)
    generate(folder, mb, seed)
    return folder


def write_params(project: Path, data: Path, args) -> None:
    from lmpipe.core.profiles import deep_merge, dump_params, profile_dict

    if args.source == "local":
        download = {"source": "local", "local": str(data / "txt" / "*.txt"),
                    "document_separator": SEPARATOR}
    else:
        download = {"source": "hf", "hf": {"path": "parquet", "text_field": "text",
                                           "data_files": [str(data / "parquet" / "*.parquet")]}}
    overlay = {
        # the instruction set the download stage also fetches comes from the same mirror as
        # the books, where there is one (offline machines); else from the network
        "data": {"mirror": str(mirror()) if mirror().is_dir() else None},
        "download": {**download, "shard_bytes": args.shard_mb * 1_000_000},
        "tokenizer": {"vocab_size": args.vocab, "num_threads": args.threads},
        "ngram": {"order": args.order, "memory_gb": args.memory_gb, "threads": args.threads,
                  "arpa": False, "sample_tokens": 0},
    }
    project.mkdir(parents=True, exist_ok=True)
    (project / "params.yaml").write_text(dump_params(deep_merge(profile_dict("default"), overlay)))


def run_stage(project: Path, stage: str) -> dict:
    """Run one stage; wall time, CPU time of its process tree, the tree's peak RSS."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "LMPIPE_TRACKING": "off",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    load_before = os.getloadavg()[0]
    log = project / f"{stage}.log"
    t0 = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", f"stages.{stage}"], cwd=project, env=env,
                                stdout=err, stderr=subprocess.STDOUT)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        total = 0
        try:
            for p in [root] + root.children(recursive=True):
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        peak = max(peak, total)
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"stage {stage} failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
    metrics = json.loads((project / "metrics" / f"{stage}.json").read_text())
    return {"wall_s": wall, "tree_peak_rss_mb": peak / 2**20, "metrics": metrics,
            "load": (load_before, os.getloadavg()[0])}


def sentencepiece_reference(project: Path, threads: int, limit_mb: float | None) -> dict:
    """sentencepiece's own batch encode (batches of lines, `threads` threads) over the same
    corpus shards, timing only the library call."""
    import sentencepiece as spm

    from lmpipe.data.corpus import iter_text_batches, split_shards

    sp = spm.SentencePieceProcessor(model_proto=(project / "data" / "tokenizer" /
                                                 "tokenizer.model").read_bytes())
    seconds, n_bytes, n_tokens = 0.0, 0, 0
    for split in ("train", "val", "test"):
        for shard in split_shards(project / "data" / "corpus" / split):
            for docs in iter_text_batches(shard, 1024):
                lines = [line for d in docs for line in d.split("\n")]
                t0 = time.perf_counter()
                ids = sp.encode(lines, out_type=int, num_threads=threads)
                seconds += time.perf_counter() - t0
                n_bytes += sum(len(d.encode("utf-8")) for d in docs)
                n_tokens += sum(map(len, ids))
                if limit_mb is not None and n_bytes >= limit_mb * 1e6:
                    return {"seconds": seconds, "bytes": n_bytes, "tokens": n_tokens}
    return {"seconds": seconds, "bytes": n_bytes, "tokens": n_tokens}


def report(results: dict, args) -> None:
    d, t, g = (results[s] for s in ("download", "tokenizer", "ngram"))
    dm, tm, gm = d["metrics"], t["metrics"], g["metrics"]
    text_mb = sum(dm[f"{s}_bytes"] for s in ("train", "val", "test")) / 1e6
    ref = results["sentencepiece"]
    enc_mbs = text_mb / tm["encode_seconds"]
    ref_mbs = ref["bytes"] / 1e6 / ref["seconds"]
    n_train = gm["train_tokens"]
    rows = [
        ("download", d["wall_s"], f"{text_mb / dm.get('corpus_seconds', d['wall_s']):.1f} MB/s of text",
         d["tree_peak_rss_mb"], f"{text_mb:,.0f} MB, {dm['documents']:,} documents", d["load"]),
        ("tokenizer", t["wall_s"],
         f"encode {enc_mbs:.1f} MB/s = {enc_mbs / ref_mbs:.0%} of sentencepiece's {ref_mbs:.1f} MB/s",
         t["tree_peak_rss_mb"],
         f"trained on {tm['train_sample_bytes'] / 1e6:,.0f} MB in {tm['train_seconds']:.0f} s; "
         f"{sum(tm[f'{s}_tokens'] for s in ('train', 'val', 'test')):,} tokens, "
         f"{sum(tm[f'{s}_shards'] for s in ('train', 'val', 'test'))} shards", t["load"]),
        ("ngram", g["wall_s"],
         f"estimate {n_train / gm['train_seconds'] / 1e6:.2f} M tok/s "
         f"({n_train / gm['train_cpu_seconds'] / 1e6:.2f} per CPU-s)",
         g["tree_peak_rss_mb"],
         f"order {args.order} on {n_train:,} tokens in {gm['train_seconds']:.0f} s, estimation peak "
         f"{gm['estimate_peak_rss_mb']:,.0f} MB, {'on disk' if gm['estimated_on_disk'] else 'in memory'}; "
         f"val ppl {gm['val_ppl']:.2f}", g["load"]),
    ]
    print()
    print(f"{cpu_model()}, {os.cpu_count()} CPUs; corpus {args.mb:g} MB (seed {args.seed}, "
          f"source {args.source}); vocab {args.vocab}, {args.threads} threads")
    print(f"{'stage':<10} {'wall s':>8} {'peak RSS MB':>12} {'load':>11}  rate / notes")
    for name, wall, rate, rss, notes, load in rows:
        print(f"{name:<10} {wall:>8.1f} {rss:>12,.0f} {load[0]:>5.1f}-{load[1]:<5.1f}  {rate}")
        print(f"{'':<45}{notes}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=1000.0, help="corpus size, MB of text")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=REPO / ".lmpipe" / "scale",
                    help="where the corpus and the scratch project go")
    ap.add_argument("--source", choices=("local", "hf"), default="local")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--order", type=int, default=5)
    ap.add_argument("--memory-gb", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--shard-mb", type=int, default=64)
    ap.add_argument("--reference-mb", type=float, default=None,
                    help="time sentencepiece on the first N MB only (default: all the text)")
    ap.add_argument("--stages", default="download,tokenizer,ngram")
    ap.add_argument("--json", type=Path, help="also write every figure here")
    args = ap.parse_args(argv)

    data = corpus(args.work, args.mb, args.seed)
    project = args.work / f"project-{args.mb:g}MB-{args.source}"
    write_params(project, data, args)
    results_path = project / "scale.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for stage in args.stages.split(","):
        print(f"scale: {stage} (load {os.getloadavg()[0]:.1f})", flush=True)
        results[stage] = run_stage(project, stage)
        if stage == "tokenizer":
            results["sentencepiece"] = sentencepiece_reference(project, args.threads, args.reference_mb)
        results_path.write_text(json.dumps(results, indent=2))
    if all(s in results for s in ("download", "tokenizer", "ngram", "sentencepiece")):
        report(results, args)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"work": str(args.work),
                                                               "json": str(args.json)},
                                         "cpu": cpu_model(), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

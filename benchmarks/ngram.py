"""Benchmark of the n-gram stage on the ~9 MB Gutenberg corpus of the offline mirror.

    python benchmarks/ngram.py                 # orders 3 and 5, vocab 4096
    python benchmarks/ngram.py --orders 3 4 5 6 --vocab 8192 --json out.json

The 14 texts of ../shared/data/gutenberg (one document each, each followed by EOS) are
tokenised with the project's tokenizer trained on them (cached under .lmpipe/bench/). Each
order then runs in a fresh process so that its peak RSS is its own: estimation (counting +
Kneser-Ney), saving the compact model, loading it back, scoring the whole stream, writing the
ARPA file. Estimation runs a second time with small chunks to show that memory is bounded by
the distinct n-grams, not by the corpus: peak memory ~ a * distinct n-grams + b * min(tokens,
chunk_tokens); a and b are printed.

`--threads 2` runs estimation and scoring on two threads (default 1, as in params).
Throughput is reported from wall-clock time and, in "(cpu)" columns, from the process's CPU
time (all threads): this machine may be shared, so the load average is printed too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _mirror() -> Path:
    env = os.environ.get("LMPIPE_MIRROR")
    return Path(env) if env else REPO.parent / "shared" / "data"


def _documents(folder: Path) -> list[str]:
    docs = []
    for path in sorted(folder.glob("*.txt")):
        if path.name.upper().startswith("NLTK") or "README" in path.name.upper():
            continue
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:  # shakespeare-caesar.txt is Latin-1
            text = raw.decode("latin-1")
        docs.append(text.replace("\r\n", "\n"))
    if not docs:
        raise SystemExit(f"no .txt files in {folder}")
    return docs


def tokenised_corpus(vocab: int, cache: Path) -> tuple[Path, dict]:
    """(path of the .npy token stream, info), trained and encoded once then cached."""
    from lmpipe.tokenizer.training import train_tokenizer

    folder = _mirror() / "gutenberg"
    docs = _documents(folder)
    digest = hashlib.sha256("\0".join(docs).encode("utf-8")).hexdigest()[:16]
    path = cache / f"gutenberg-{vocab}-{digest}.npy"
    info_path = path.with_suffix(".json")
    if path.exists() and info_path.exists():
        return path, json.loads(info_path.read_text())
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tok = train_tokenizer(docs, vocab, num_threads=os.cpu_count() or 1)
    ids = tok.encode_documents(docs)
    info = {
        "documents": len(docs),
        "bytes": sum(len(d.encode("utf-8")) for d in docs),
        "tokens": int(ids.size),
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "unk_id": tok.unk_id,
        "bos_id": tok.bos_id,
        "tokenize_seconds": round(time.perf_counter() - t0, 2),
    }
    np.save(path, ids)
    info_path.write_text(json.dumps(info, indent=2))
    return path, info


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args) -> dict:
    """One order in this (fresh) process; prints a JSON line."""
    from lmpipe.ngram.arpa import write_arpa
    from lmpipe.ngram.estimate import estimate
    from lmpipe.ngram.model import NgramModel

    info = json.loads(Path(args.tokens).with_suffix(".json").read_text())
    ids = np.load(args.tokens)
    base_rss = _rss_mb()
    kw = dict(unk_id=info["unk_id"], bos_id=info["bos_id"])
    out: dict = {"order": args.order, "tokens": int(ids.size), "chunk_tokens": args.chunk}
    t0, c0 = time.perf_counter(), time.process_time()
    model = estimate(ids, info["vocab_size"], info["eos_id"], order=args.order, chunk_tokens=args.chunk,
                     threads=args.threads, **kw)
    out["estimate_s"] = time.perf_counter() - t0
    out["estimate_cpu_s"] = time.process_time() - c0
    out["peak_rss_mb"] = _peak_mb()
    out["base_rss_mb"] = base_rss
    out["ngrams"] = model.meta["ngrams_per_order"]
    out["model_mem_mb"] = model.nbytes() / 2**20
    if args.estimate_only:
        return out
    with tempfile.TemporaryDirectory() as tmp:
        path = model.save(tmp)
        out["model_mb"] = path.stat().st_size / 2**20
        del model
        t0 = time.perf_counter()
        model = NgramModel.load(tmp)
        out["load_s"] = time.perf_counter() - t0
        t0, c0 = time.perf_counter(), time.process_time()
        lp = model.logprobs(ids, threads=args.threads)
        out["score_s"] = time.perf_counter() - t0
        out["score_cpu_s"] = time.process_time() - c0
        out["train_ppl"] = float(np.exp(-lp.mean()))
        del lp
        if not args.no_arpa:
            t0 = time.perf_counter()
            arpa = write_arpa(model, Path(tmp) / "model.arpa.gz")
            out["arpa_s"] = time.perf_counter() - t0
            out["arpa_mb"] = arpa.stat().st_size / 2**20
    out["peak_rss_all_mb"] = _peak_mb()
    return out


def run_worker(tokens: Path, order: int, chunk: int, extra: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--tokens", str(tokens), "--order", str(order),
           "--chunk", str(chunk), *extra]  # extra carries --threads
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if proc.returncode:
        raise SystemExit(f"worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--orders", type=int, nargs="+", default=[3, 5])
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--cache", type=Path, default=REPO / ".lmpipe" / "bench")
    ap.add_argument("--small-chunk", type=int, default=1 << 18, help="chunk size of the memory run")
    ap.add_argument("--no-arpa", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write the results here")
    # worker mode (internal)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tokens", help=argparse.SUPPRESS)
    ap.add_argument("--order", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--chunk", type=int, default=1 << 23, help=argparse.SUPPRESS)
    ap.add_argument("--estimate-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    tokens, info = tokenised_corpus(args.vocab, args.cache)
    print(
        f"corpus: {info['documents']} Gutenberg texts, {info['bytes'] / 1e6:.2f} MB, "
        f"{info['tokens']:,} tokens (BPE vocab {info['vocab_size']}); "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    rows = []
    for order in args.orders:
        threads = ["--threads", str(args.threads)]
        r = run_worker(tokens, order, 1 << 23, threads + (["--no-arpa"] if args.no_arpa else []))
        small = run_worker(tokens, order, args.small_chunk, threads + ["--estimate-only"])
        r["small_chunk"] = {k: small[k] for k in ("chunk_tokens", "estimate_s", "peak_rss_mb", "base_rss_mb")}
        rows.append(r)

    head = (f"{'order':>5} {'distinct n-grams':>18} {'estimate':>9} {'est Mtok/s':>10} {'(cpu)':>6} "
            f"{'score Mtok/s':>12} {'(cpu)':>6} {'peak RSS':>9} {'model':>8} {'load':>6} {'ARPA.gz':>8} {'write':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        n = r["tokens"]
        total = sum(r["ngrams"][1:])
        print(
            f"{r['order']:>5} {total:>18,} {r['estimate_s']:>8.2f}s {n / r['estimate_s'] / 1e6:>10.2f} "
            f"{n / r['estimate_cpu_s'] / 1e6:>6.2f} {n / r['score_s'] / 1e6:>12.2f} {n / r['score_cpu_s'] / 1e6:>6.2f} "
            f"{r['peak_rss_all_mb']:>7.0f}MB {r['model_mb']:>6.1f}MB {r['load_s']:>5.2f}s "
            + (f"{r['arpa_mb']:>6.1f}MB {r['arpa_s']:>5.1f}s" if "arpa_mb" in r else "")
        )
    print()
    print("distinct n-grams per order (order 1 = token types seen):")
    for r in rows:
        print(f"  order {r['order']}: {r['ngrams']}")
    print()
    print("memory (estimation peak RSS minus the RSS before it, tokens already loaded):")
    for r in rows:
        total = sum(r["ngrams"][1:])
        big = r["peak_rss_mb"] - r["base_rss_mb"]
        sm = r["small_chunk"]["peak_rss_mb"] - r["small_chunk"]["base_rss_mb"]
        print(
            f"  order {r['order']}: one chunk {big:.0f} MB; chunks of {r['small_chunk']['chunk_tokens']:,} "
            f"tokens {sm:.0f} MB = {sm * 2**20 / total:.0f} bytes per distinct n-gram "
            f"(estimation {r['small_chunk']['estimate_s']:.2f}s); the model itself "
            f"{r['model_mem_mb'] * 2**20 / total:.0f} bytes per n-gram"
        )
    if args.json:
        args.json.write_text(json.dumps({"corpus": info, "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training and generation speed on this machine, in one run (prints a table).

    python benchmarks/train.py                  # the default profile's Transformer
    python benchmarks/train.py --profile smoke --steps 3 --json out.json

Measures, in the same process one after the other:
  * the bf16 and fp32 peaks of a 2048x2048 matmul (best of several);
  * the shared trainer's tokens/s on the profile's `pretrain` Transformer (`Trainer.train_step`:
    forward, backward, clipping, AdamW), bf16 autocast and fp32, and the model FLOPs
    utilisation (MFU) against the bf16 peak measured in this run. Peaks and steps are
    interleaved round by round and the ratios are medians of per-round ratios, so a load
    change on a shared machine hits both sides of each comparison alike:
        FLOPs per token = 6 N + 12 n_layer d_model T     (PaLM / nanoGPT; attention's
        causal half is not discounted; N counts every parameter once, tied ones included)
  * KV-cache against no-cache generation of 256 new tokens (`lmpipe.models.sampling.generate`,
    greedy, fp32).
Targets (issue 4): bf16 training >= 2.5x fp32, MFU >= 20%, cached generation >= 5x.

Throughput on a shared machine swings with the load of other processes: the table reports
the 1-minute load average before and after, and every timing is the best of its repeats.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the stages do (see stages/pretrain.py)
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmpipe.core.params import TrainParams
from lmpipe.core.profiles import profile_dict  # noqa: E402
from lmpipe.data.batches import TokenBatches  # noqa: E402
from lmpipe.models.store import build_model, count_parameters  # noqa: E402
from lmpipe.train.runtime import Runtime, cpu_supports_bf16, resolve_device
from lmpipe.train.trainer import Trainer  # noqa: E402

TARGETS = {"bf16_speedup": 2.5, "mfu": 0.20, "cache_speedup": 5.0}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 2048, reps: int = 5) -> float:
    """Best GFLOP/s of an n x n @ n x n matmul over `reps` repeats."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def make_trainer(model_cfg: dict, train: TrainParams, context: int, precision: str,
                 device: torch.device) -> Trainer:
    torch.manual_seed(0)
    model = build_model("transformer", model_cfg)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model_cfg["vocab_size"], size=context * train.batch_size * 64)
    dtype = torch.bfloat16 if precision == "bf16" else None
    rt = Runtime(device=device, dtype=dtype, threads=torch.get_num_threads())
    cfg = train.model_copy(update={"precision": precision, "max_steps": 10**6,
                                   "max_tokens": None, "max_seconds": None, "progress": False})
    trainer = Trainer(model, cfg, rt=rt,
                      batches=TokenBatches(tokens, context, train.batch_size, seed=0))
    trainer._set_lr(cfg.lr)
    return trainer


def timed_step(trainer: Trainer, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    trainer.train_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def training_speed(model_cfg: dict, train: TrainParams, context: int, device: torch.device,
                   rounds: int, warmup: int = 2) -> dict:
    """Interleaved rounds of (bf16 peak, fp32 peak, one bf16 step, one fp32 step).

    Other processes' load changes from second to second on a shared machine; measuring the
    things we compare side by side, round after round, keeps the ratios honest. Ratios are
    medians over the rounds; the absolute figures are bests and medians.
    """
    trainers = {p: make_trainer(model_cfg, train, context, p, device) for p in ("bf16", "fp32")}
    n_params = count_parameters(trainers["bf16"].model)
    for _ in range(warmup):
        for tr in trainers.values():
            tr.train_step()
    L, d = model_cfg["n_layer"], model_cfg["d_model"]
    flops_per_token = 6 * n_params + 12 * L * d * context
    tok = trainers["bf16"].tokens_per_step
    rows = []
    for _ in range(rounds):
        row = {"peak_bf16": matmul_peak(torch.bfloat16, device, reps=3),
               "peak_fp32": matmul_peak(torch.float32, device, reps=3)}
        row["bf16_s"] = timed_step(trainers["bf16"], device)
        row["fp32_s"] = timed_step(trainers["fp32"], device)
        rows.append(row)
    med = lambda xs: float(np.median(xs))  # noqa: E731
    out = {"params": n_params, "tokens_per_step": tok, "flops_per_token": flops_per_token,
           "rounds": rows,
           "peak_gflops": {"bf16": max(r["peak_bf16"] for r in rows),
                           "fp32": max(r["peak_fp32"] for r in rows)}}
    for p in ("bf16", "fp32"):
        times = [r[f"{p}_s"] for r in rows]
        out[f"train_{p}"] = {"tokens_per_s": tok / min(times), "tokens_per_s_median": tok / med(times),
                             "achieved_gflops": flops_per_token * tok / min(times) / 1e9}
    out["bf16_speedup"] = med([r["fp32_s"] / r["bf16_s"] for r in rows])
    out["mfu"] = med([flops_per_token * tok / r["bf16_s"] / 1e9 / r["peak_bf16"] for r in rows])
    out["mfu_best"] = out["train_bf16"]["achieved_gflops"] / out["peak_gflops"]["bf16"]
    return out


def generation_speed(model_cfg: dict, device: torch.device, new_tokens: int = 256,
                     prompt_len: int = 8, rounds: int = 2) -> dict:
    """Greedy generation with and without the KV cache, alternated; the ratio is the median."""
    from lmpipe.models.sampling import generate

    torch.manual_seed(0)
    model = build_model("transformer", model_cfg).to(device).eval()
    prompt = list(range(3, 3 + prompt_len))
    generate(model, prompt, 8, temperature=0.0, device=device)   # warm-up
    times: dict[str, list[float]] = {"cache": [], "no_cache": []}
    n_out = new_tokens
    for _ in range(rounds):
        for use_cache in (True, False):
            t = time.perf_counter()
            ids = generate(model, prompt, new_tokens, temperature=0.0, use_cache=use_cache,
                           device=device)
            times["cache" if use_cache else "no_cache"].append(time.perf_counter() - t)
            n_out = len(ids)
    out = {k: {"seconds": min(v), "tokens_per_s": n_out / min(v)} for k, v in times.items()}
    out["speedup"] = float(np.median([b / a for a, b in zip(times["cache"], times["no_cache"])]))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="example: python benchmarks/train.py --steps 6")
    ap.add_argument("--profile", default="default", help="params profile: default, smoke, gpu")
    ap.add_argument("--steps", type=int, default=6,
                    help="interleaved rounds: matmul peaks, one bf16 and one fp32 training step")
    ap.add_argument("--vocab", type=int, default=None,
                    help="vocabulary size (default: the profile's tokenizer.vocab_size)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    device = resolve_device(args.device)
    params = profile_dict(args.profile)
    pre = params["pretrain"]
    vocab = args.vocab or params["tokenizer"]["vocab_size"]
    model_cfg = {"vocab_size": vocab, **pre["model"]}
    train = TrainParams(**pre["train"])
    context = pre["model"]["context_length"]
    load0 = os.getloadavg()[0]

    res: dict = {"device": str(device), "cpu": cpu_name(), "threads": torch.get_num_threads(),
                 "torch": torch.__version__, "profile": args.profile, "model": model_cfg,
                 "batch_size": train.batch_size, "grad_accum": train.grad_accum,
                 "cpu_native_bf16": cpu_supports_bf16(), "load_before": load0}
    speed = training_speed(model_cfg, train, context, device, args.steps)
    rounds = speed.pop("rounds")
    res.update(speed)
    res["rounds"] = rounds
    res["generation"] = generation_speed(model_cfg, device, args.new_tokens)
    res["load_after"] = os.getloadavg()[0]
    res["cache_speedup"] = res["generation"]["speedup"]

    tb, tf, g = res["train_bf16"], res["train_fp32"], res["generation"]
    rows = [
        ("machine", f"{res['cpu']} | {res['device']} | {res['threads']} threads | "
                    f"torch {res['torch']} | load {load0:.1f} -> {res['load_after']:.1f}"),
        ("model", f"Transformer {pre['model']['n_layer']}x{pre['model']['d_model']}, "
                  f"{pre['model']['n_head']} heads, T={context}, vocab {vocab}, "
                  f"{res['params']:,} params; batch {train.batch_size}x{train.grad_accum}"),
        ("matmul 2048 bf16 peak", f"{res['peak_gflops']['bf16']:8.1f} GFLOP/s"),
        ("matmul 2048 fp32 peak", f"{res['peak_gflops']['fp32']:8.1f} GFLOP/s"),
        ("train bf16", f"{tb['tokens_per_s']:8.0f} tok/s (median {tb['tokens_per_s_median']:.0f}); "
                       f"{tb['achieved_gflops']:.1f} GFLOP/s"),
        ("train fp32", f"{tf['tokens_per_s']:8.0f} tok/s (median {tf['tokens_per_s_median']:.0f}); "
                       f"{tf['achieved_gflops']:.1f} GFLOP/s"),
        ("bf16 / fp32 training", f"{res['bf16_speedup']:8.2f}x   (target >= {TARGETS['bf16_speedup']}x)"),
        ("MFU vs bf16 peak", f"{100 * res['mfu']:8.1f}%   (target >= {100 * TARGETS['mfu']:.0f}%; "
                             f"best step vs best peak {100 * res['mfu_best']:.1f}%)"),
        (f"generate {args.new_tokens}, KV cache", f"{g['cache']['tokens_per_s']:8.1f} tok/s "
                                                 f"({g['cache']['seconds']:.2f} s)"),
        (f"generate {args.new_tokens}, no cache", f"{g['no_cache']['tokens_per_s']:8.1f} tok/s "
                                                 f"({g['no_cache']['seconds']:.2f} s)"),
        ("cache speed-up", f"{res['cache_speedup']:8.2f}x   (target >= {TARGETS['cache_speedup']}x)"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"{'measure'.ljust(width)} | result")
    print(f"{'-' * width}-|-{'-' * 60}")
    for k, v in rows:
        print(f"{k.ljust(width)} | {v}")
    met = {k: res[k] >= v for k, v in TARGETS.items()}
    print("targets met: " + ", ".join(f"{k} {'yes' if ok else 'NO'}" for k, ok in met.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Inference speed of the profile's Transformer: KV-cached vs uncached generation, and scoring.

Used by benchmarks/train.py; each function returns a dict of figures and bounds:

* `generation_speed`: greedy generation of `new_tokens` at batch 1 with and without the KV
  cache (`lmpipe.models.sampling.generate`, alternated round by round), whether the two
  outputs are identical token for token, and the floor of a decode step on this machine: the
  model's matrices applied to one vector each, nothing else, as `generate` runs them (one
  thread on a CPU). Decoding one token reads every weight once, so that pass bounds the rate
  of any decoder that keeps the weights in fp32.
* `scoring_speed`: `lmpipe.evaluation.neural.score_windows` (what `evaluate` runs) in fp32
  and in bf16 on random tokens, in non-overlapping windows of the context (the forward rate)
  and in windows sliding by half the context (`evaluate`'s default, which reads every token
  twice: about half the rate), and the bound at the bf16 peak: peak / forward FLOPs per token.

Run as a script (`python benchmarks/inference.py --model-json CFG --json OUT ...`) it measures
both and writes them as JSON: benchmarks/train.py runs it in a child process so that these
figures come from the environment `lmpipe generate` and `evaluate` run in, not from the
training benchmark's (which sets OMP_WAIT_POLICY=PASSIVE as the training stages do: sleeping
OpenMP threads cost `score_windows` about a fifth of its speed, 54k vs 69k tok/s measured).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmpipe.evaluation.neural import score_windows  # noqa: E402
from lmpipe.models.sampling import decode_threads, generate  # noqa: E402
from lmpipe.models.store import build_model  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def scrambled_model(model_cfg: dict, device: torch.device) -> nn.Module:
    """The profile's Transformer with every matrix drawn at std 2/sqrt(fan_in): at the
    default init an untrained model repeats one token under greedy decoding (at unit gain a
    few), which would make 'identical output' say little; at gain 2 most tokens differ."""
    torch.manual_seed(0)
    model = build_model("transformer", model_cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 2.0 / math.sqrt(p.shape[1]))
    return model.to(device).eval()


def weights_pass_seconds(model: nn.Module, device: torch.device, passes: int = 256,
                         repeats: int = 3) -> float:
    """Seconds per pass of the model's Linear layers over a single vector each: `passes`
    passes in a row (as many as the tokens generated), best of `repeats`. Nothing else runs
    between them, so this is the floor of a decode step that reads fp32 weights."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    xs = [torch.randn(1, m.in_features, device=device) for m in linears]
    best = float("inf")
    with torch.inference_mode(), decode_threads(device):
        for _ in range(repeats):
            _sync(device)
            t = time.perf_counter()
            for _ in range(passes):
                for m, x in zip(linears, xs):
                    F.linear(x, m.weight, m.bias)
            _sync(device)
            best = min(best, (time.perf_counter() - t) / passes)
    return best


def generation_speed(model_cfg: dict, device: torch.device, new_tokens: int = 256,
                     rounds: int = 3) -> dict:
    """Cached vs uncached greedy generation; the speed-up is the median of per-round ratios.

    The prompt is one token (EOS, as `lmpipe generate` starts a document), so that prompt +
    output fit the context and the two paths must agree exactly."""
    model = scrambled_model(model_cfg, device)
    prompt = [2]
    context = model.config.context_length
    new_tokens = min(new_tokens, context + 1 - len(prompt))
    generate(model, prompt, 8, temperature=0.0, device=device)   # warm-up
    times: dict[str, list[float]] = {"cache": [], "no_cache": []}
    cpu: dict[str, list[float]] = {"cache": [], "no_cache": []}
    outs: dict[str, list[int]] = {}
    for _ in range(rounds):
        for use_cache in (True, False):
            key = "cache" if use_cache else "no_cache"
            _sync(device)
            t, c = time.perf_counter(), time.process_time()
            outs[key] = generate(model, prompt, new_tokens, temperature=0.0,
                                 use_cache=use_cache, device=device)
            _sync(device)
            times[key].append(time.perf_counter() - t)
            cpu[key].append(time.process_time() - c)
    n = len(outs["cache"])
    # tokens per CPU-second: the rate while the (one) decoding thread had a core, which on a
    # shared machine says what the code does apart from waiting for one
    out = {k: {"seconds": min(v), "tokens_per_s": n / min(v),
               "tokens_per_s_median": n / float(np.median(v)),
               "tokens_per_cpu_s": n / min(cpu[k])} for k, v in times.items()}
    out["new_tokens"] = n
    out["speedup"] = float(np.median([b / a for a, b in zip(times["cache"], times["no_cache"])]))
    out["identical"] = outs["cache"] == outs["no_cache"]
    out["distinct_tokens"] = len(set(outs["cache"]))
    floor_s = weights_pass_seconds(model, device, passes=n)
    out["floor_tokens_per_s"] = 1.0 / floor_s
    out["weight_mbytes"] = sum(m.weight.numel() * m.weight.element_size()
                               for m in model.modules() if isinstance(m, nn.Linear)) / 1e6
    out["weight_gbytes_per_s"] = out["weight_mbytes"] / 1e3 / floor_s
    return out


def scoring_speed(model_cfg: dict, device: torch.device, batch_size: int, peak_bf16: float,
                  windows: int = 32, rounds: int = 3) -> dict:
    """Tokens/s of `score_windows` over `windows` random windows, fp32 and bf16 alternated;
    `<dtype>_half`: the same tokens in windows sliding by half the context."""
    model = scrambled_model(model_cfg, device)
    context = model.config.context_length
    ids = np.random.default_rng(0).integers(3, model_cfg["vocab_size"], size=windows * context)
    score_windows(model, ids[:context * batch_size], context, eos_id=2, batch_size=batch_size)
    times: dict[str, list[float]] = {"float32": [], "bfloat16": [], "float32_half": [],
                                     "bfloat16_half": []}
    for _ in range(rounds):
        for key in times:
            dtype, half = key.removesuffix("_half"), key.endswith("_half")
            _sync(device)
            t = time.perf_counter()
            score_windows(model, ids, context, eos_id=2, batch_size=batch_size, dtype=dtype,
                          stride=max(1, context // 2) if half else None)
            _sync(device)
            times[key].append(time.perf_counter() - t)
    fwd_flops = model.flops_per_token(training=False)
    out = {k: {"tokens_per_s": ids.size / min(v), "tokens_per_s_median": ids.size / float(np.median(v))}
           for k, v in times.items()}
    out["forward_flops_per_token"] = fwd_flops
    out["bound_tokens_per_s"] = peak_bf16 * 1e9 / fwd_flops
    out["batch_size"] = batch_size
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="generation and scoring speed (JSON out)")
    ap.add_argument("--model-json", required=True, help="the Transformer's config, as JSON")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, required=True, help="evaluate.batch_size")
    ap.add_argument("--peak-bf16", type=float, required=True, help="GFLOP/s, for the bound")
    ap.add_argument("--json", required=True, help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device, cfg = torch.device(args.device), json.loads(args.model_json)
    res = {"generation": generation_speed(cfg, device, args.new_tokens),
           "scoring": scoring_speed(cfg, device, args.batch_size, args.peak_bf16)}
    Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The speed benchmark and the GPU check: what they print is what they measured.

The speed targets themselves live in benchmarks/train.py, never in a timed test: these tests
check that the table and its JSON agree, that every ratio is the one its target is about,
and that the profiler breakdown puts a step's time (backward included) where it belongs.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from lmpipe.core.params import TrainParams
from lmpipe.data.batches import TokenBatches
from lmpipe.models.store import build_model
from lmpipe.train.runtime import Runtime
from lmpipe.train.trainer import Trainer
from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import breakdown  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

# tiny tensors gain nothing from threads (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_benchmark_table_shows_each_measure_next_to_its_target(tmp_path):
    """The README's quick command: the smoke model, two rounds, no compile."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "benchmarks/train.py", "--profile", "smoke",
                           "--steps", "2", "--no-compile", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    table = proc.stdout
    # the machine, and the load before and after, head the table
    assert f"load {res['load_before']:.1f} -> {res['load_after']:.1f}" in table
    assert res["cpu"] in table
    # each ratio is the one its target is about, from the same run's figures
    rounds = res["rounds"]
    flops = res["flops_per_token"] * res["tokens_per_step"]
    mfus = sorted(flops / r["bf16_s"] / 1e9 / r["peak_bf16"] for r in rounds)
    assert res["mfu"] == pytest.approx(sum(mfus) / len(mfus))          # median of two
    assert res["bf16_speedup_target"] == pytest.approx(0.5 * res["peak_ratio"])
    lines = {line.split("|")[0].strip(): line for line in table.splitlines() if "|" in line}
    assert f">= {res['bf16_speedup_target']:.2f}x" in lines["bf16 / fp32 training"]
    assert ">= 30%" in lines["MFU vs bf16 peak"]
    assert lines["MFU vs bf16 peak"].rstrip().endswith("yes" if res["mfu"] >= 0.30 else "NO")
    gen = res["generation"]
    assert gen["identical"] is True and gen["distinct_tokens"] > 3
    assert ">= 1,500 tok/s" in lines[f"generate {gen['new_tokens']}, KV cache"]
    assert ">= 50,000 tok/s" in next(v for k, v in lines.items() if k.startswith("score"))
    # and the rate of evaluate's default (windows sliding by half the context) beside it
    key = "bfloat16" if res["cpu_native_bf16"] else "float32"
    assert (f"{res['scoring'][key + '_half']['tokens_per_s']:,.0f} tok/s (every token read twice)"
            in lines["evaluate's default, stride T/2"])
    # the bound is the bf16 peak over the forward FLOPs per token
    sc = res["scoring"]
    assert sc["bound_tokens_per_s"] == pytest.approx(
        res["peak_gflops"]["bf16"] * 1e9 / sc["forward_flops_per_token"])
    # the breakdown covers the step: its shares add up to the whole
    assert sum(share for _, _, share in res["breakdown"]) == pytest.approx(1.0, abs=1e-6)
    assert "where a bf16 training step's time goes" in table


def small_trainer() -> Trainer:
    torch.manual_seed(0)
    cfg = dict(vocab_size=96, context_length=64, n_layer=2, n_head=2, d_model=64)
    model = build_model("transformer", cfg)
    train = TrainParams(optimizer="muon", batch_size=8, max_steps=100, progress=False,
                        precision="fp32")
    tokens = torch.randint(0, 96, (64 * 8 * 8,)).numpy()
    return Trainer(model, train, batches=TokenBatches(tokens, 64, 8, seed=0),
                   rt=Runtime(torch.device("cpu"), None, threads=1))


def test_the_breakdown_counts_backward_time_in_the_forward_part_it_belongs_to():
    trainer = small_trainer()
    trainer.train_step()
    rows = {part: ms for part, ms, _ in breakdown.step_breakdown(trainer, steps=2)}
    for part in ("attention (scores, softmax, weighted sum)", "norms", "MLP matmuls (fc, proj)",
                 "loss (log-softmax, nll)", "rotary", "Muon Newton-Schulz", "AdamW",
                 "data loading"):
        assert rows.get(part, 0) > 0, part
    assert rows.get("other", 0) < 0.05 * sum(rows.values())
    # every backward node goes to the part of the forward op that made it: in one step the
    # two MLP matmuls of each layer have their two backward matmul nodes there, and no
    # matmul's backward is left unattributed
    with breakdown._labels(trainer), torch.profiler.profile() as prof:
        trainer.train_step()
    roots = {}
    for event, label in breakdown.labelled_events(prof.events()):
        if event.name.startswith("autograd::engine::evaluate_function: MmBackward"):
            roots.setdefault(id(event), label)
    n_layer = trainer.model.config.n_layer
    assert list(roots.values()).count("MLP matmuls (fc, proj)") == 2 * n_layer
    assert list(roots.values()).count("attention projections (qkv, out)") == 2 * n_layer
    assert "other" not in roots.values()
    # and the labels are gone afterwards: the library is as it was
    import lmpipe.models.transformer as tm
    assert not hasattr(tm.apply_rotary, "__wrapped__") and "next" not in vars(trainer.batches)


# ----------------------------------------------------------------------------- the GPU check
def test_gpu_marked_tests_are_deselected_and_listed_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the gpu tests run here (benchmarks/gpu.sh)")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_gpu.py"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 5, proc.stdout[-2000:]          # pytest: no test ran
    listed = [line for line in proc.stdout.splitlines() if line.startswith("DESELECTED ")]
    assert len(listed) == 5 and "passed" not in proc.stdout
    assert "5 deselected" in proc.stdout


def test_gpu_check_refuses_plainly_without_an_nvidia_gpu():
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has an NVIDIA GPU: run benchmarks/gpu.sh itself")
    proc = subprocess.run(["bash", "benchmarks/gpu.sh"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert "no NVIDIA GPU on this machine" in proc.stderr


# ----------------------------------------------------------------------------- the defaults' sweep
@pytest.mark.slow
def test_the_defaults_sweep_trains_each_point_once_and_prints_its_table(tmp_path, mirror):
    """`benchmarks/sweep_default.py` (README, "Why these defaults") on the smoke profile with
    a 2-point grid over the RNN cell: the n-gram and the Transformer are trained once and
    shared, each cell gets its own RNN, and the table has a row per point with every figure."""
    env = {**os.environ, "LMPIPE_MIRROR": str(mirror), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "benchmarks/sweep_default.py", "--profile", "smoke", "--grid",
           "rnn.model.cell=rnn,gru", "--root", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:2] == ["cell", "Nval"])
    columns = lines[head].split()
    rows = {line.split()[0]: dict(zip(columns, line.split())) for line in lines[head + 1:head + 3]}
    assert set(rows) == {"rnn", "gru"}
    for key in ("Nval", "Ntest", "Tval", "Ttest"):             # shared: the same run
        assert rows["rnn"][key] == rows["gru"][key] and float(rows["rnn"][key]) > 0
    assert rows["rnn"]["Rval"] != rows["gru"]["Rval"]          # one RNN per cell
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir() if p.is_dir()) == \
        ["data", "ngram", "pretrain", "rnn", "rnn"]


# ----------------------------------------------------------------------------- the nanoGPT protocol
@pytest.mark.slow
def test_the_nanogpt_protocol_scores_the_last_tenth_in_nats_per_byte(tmp_path, mirror):
    """`benchmarks/nanogpt_protocol.py` (issue 12) on the smoke profile: it trains through the
    stages, scores exactly the last 10% of the file's bytes, and prints bits per byte x ln 2;
    the smoke model misses the 1.45 target, which the exit status says."""
    env = {**os.environ, "LMPIPE_MIRROR": str(mirror), "PYTHONPATH": str(REPO)}
    keep = tmp_path / "np"
    proc = subprocess.run([sys.executable, "benchmarks/nanogpt_protocol.py", "--profile", "smoke",
                           "--keep", str(keep)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = (mirror / "tinyshakespeare.txt").read_bytes()
    assert (keep / "last10.txt").read_bytes() == data[int(0.9 * len(data)):]
    context = yaml.safe_load((keep / "params.yaml").read_text())["pretrain"]["model"]["context_length"]
    scored = subprocess.run([sys.executable, "-m", "lmpipe.cli", "eval", "--model", "transformer",
                             "--text", str(keep / "last10.txt"), "--stride", str(context),
                             "--json"], cwd=keep,
                            env={**env, "LMPIPE_ROOT": str(keep),
                                 "LMPIPE_PARAMS": str(keep / "params.yaml"),
                                 "LMPIPE_TRACKING": "off"},
                            capture_output=True, text=True, timeout=300)
    assert scored.returncode == 0, scored.stderr[-2000:]
    want = json.loads(scored.stdout)
    line = next(x for x in proc.stdout.splitlines() if "nats/byte, windows" in x)
    assert f"{want['bpb'] * math.log(2):.4f}  (target <= 1.45: NOT met)" in line
    assert f"{want['bytes']:,} bytes, {want['tokens']:,} tokens" in proc.stdout


def test_the_nanogpt_protocol_refuses_a_kept_folder_that_is_not_empty(tmp_path):
    """Its stages would resume from the folder's checkpoints and print the earlier run's
    training seconds as if just measured: it exits 2 before touching anything."""
    keep = tmp_path / "np"
    (keep / "metrics").mkdir(parents=True)
    (keep / "metrics" / "pretrain.json").write_text('{"train_seconds": 293.6}')
    proc = subprocess.run([sys.executable, "benchmarks/nanogpt_protocol.py", "--keep", str(keep)],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert str(keep) in proc.stderr and "not empty" in proc.stderr
    assert sorted(p.name for p in keep.rglob("*")) == ["metrics", "pretrain.json"]

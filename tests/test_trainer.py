"""The shared trainer: it learns, its schedule and groups are right, the stages run end to end."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lmpipe.data.batches import TokenBatches, eval_batches
from lmpipe.models.store import build_model
from lmpipe.train.optim import lr_at, param_groups
from lmpipe.train.runtime import Runtime, resolve_precision
from lmpipe.train.trainer import NonFiniteLossError, Trainer
from tests.helpers.trainer import (
    make_project,
    markov_tokens,
    run_stage,
    safetensors_parts,
    tiny_train,
)
from tests.test_checkpoint import weights_bytes

CPU = Runtime(device=torch.device("cpu"), dtype=None, threads=1)


def tiny_transformer(vocab=32, T=16, dropout=0.0, tie=True):
    torch.manual_seed(0)
    return build_model("transformer", dict(vocab_size=vocab, context_length=T, n_layer=2,
                                           n_head=2, d_model=32, dropout=dropout,
                                           tie_embeddings=tie))


# ----------------------------------------------------------------------------- schedule
def test_warmup_then_cosine_values():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, **kw) == pytest.approx(0.1)          # (0 + 1) / 10
    assert lr_at(4, **kw) == pytest.approx(0.5)
    assert lr_at(9, **kw) == pytest.approx(1.0)          # warmup ends at the peak
    assert lr_at(10, **kw) == pytest.approx(1.0)         # cosine starts at the peak
    assert lr_at(60, **kw) == pytest.approx(0.55)        # halfway: (lr + min_lr) / 2
    assert lr_at(110, **kw) == pytest.approx(0.1)        # ends at min_lr
    assert lr_at(500, **kw) == pytest.approx(0.1)        # and stays there
    assert lr_at(35, **kw) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.25)))
    # no warmup
    assert lr_at(0, lr=1.0, min_lr=0.0, warmup_steps=0, max_steps=10) == pytest.approx(1.0)


class FakeClock:
    """time.perf_counter for the trainer: advances 1 ms per reading, plus whatever `stall`
    adds (a machine that is busy with something else)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 0.001
        return self.now


class StallingBatches(TokenBatches):
    """Token batches whose loading stalls `seconds` of (fake) wall time before `at` batches."""

    def __init__(self, *args, clock: FakeClock, at: set[int], seconds: float, **kw):
        super().__init__(*args, **kw)
        self.clock, self.at, self.seconds, self.served = clock, at, seconds, 0

    def next(self):
        if self.served in self.at:
            self.clock.now += self.seconds
        self.served += 1
        return super().next()


def test_a_busy_machine_trains_byte_identical_weights(monkeypatch, tmp_path):
    """Issue 18: with max_seconds set but never reached, stalls in data loading (another
    process on the machine) must not change any learning rate, hence any weight."""
    import lmpipe.train.trainer as tr

    toks = markov_tokens(3000, 32)
    outcome = {}
    for name, stalls in (("quiet", set()), ("busy", {3, 4, 5})):
        clock = FakeClock()
        monkeypatch.setattr(tr.time, "perf_counter", clock)
        model = tiny_transformer()
        cfg = tiny_train(max_steps=60, max_seconds=10_000, warmup_steps=2, eval_every=20)
        batches = StallingBatches(toks, 16, 4, seed=0, clock=clock, at=stalls, seconds=2_000)
        res = Trainer(model, cfg, batches=batches, rt=CPU,
                      eval_batches=eval_batches(toks, 16, 4, 2)).fit()
        outcome[name] = ([h["lr"] for h in res.history], res.seconds,
                         weights_bytes(model, tmp_path / f"{name}.st"), res)
    assert outcome["busy"][1] > 6_000 > outcome["quiet"][1]    # the stalls did happen
    assert outcome["busy"][0] == outcome["quiet"][0]           # the same schedule, step by step
    assert outcome["busy"][2] == outcome["quiet"][2]           # byte-identical weights
    assert all(o[3].stopped_by == "max_steps" and o[3].step == 60 for o in outcome.values())


def test_max_seconds_stops_the_run_records_it_and_never_bends_the_schedule(monkeypatch):
    """max_seconds is a guard: the lr of every step it lets run is the step schedule's, and
    the result says the run was stopped by it (with a warning: not reproducible)."""
    import lmpipe.train.trainer as tr

    clock = iter(range(0, 10_000))   # perf_counter advances one "second" per reading
    monkeypatch.setattr(tr.time, "perf_counter", lambda: float(next(clock)))
    model = tiny_transformer()
    cfg = tiny_train(max_steps=1000, max_seconds=20, warmup_steps=2, eval_every=1000)
    t = Trainer(model, cfg, batches=TokenBatches(markov_tokens(3000, 32), 16, 4, seed=0), rt=CPU)
    with pytest.warns(RuntimeWarning, match="stopped by train.max_seconds"):
        res = t.fit()
    assert res.stopped_by == "max_seconds" and res.step < 1000 and res.seconds >= 20
    want = [lr_at(i, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=2, max_steps=1000)
            for i in range(res.step)]
    assert [h["lr"] for h in res.history] == pytest.approx(want)
    assert res.history[-1]["lr"] > 0.9 * cfg.lr                # nowhere near the decay's end


def test_stopped_by_names_the_budget_that_ended_the_run():
    toks = markov_tokens(3000, 32)
    for overrides, reason in ((dict(max_steps=5, max_tokens=None), "max_steps"),
                              (dict(max_steps=None, max_tokens=4 * 16 * 3), "max_tokens"),
                              (dict(max_steps=50, max_tokens=4 * 16 * 3), "max_tokens"),
                              (dict(max_steps=3, max_tokens=4 * 16 * 3), "max_steps")):
        t = Trainer(tiny_transformer(), tiny_train(**overrides),
                    batches=TokenBatches(toks, 16, 4, seed=0), rt=CPU)
        res = t.fit()
        assert (res.stopped_by, res.step) == (reason, 3 if reason == "max_tokens" else
                                              overrides["max_steps"]), overrides


@pytest.mark.parametrize("select", ["best", "last"])
def test_select_publishes_the_best_or_the_last_step(select):
    """The model holds the weights of the lowest periodic val loss (select: best) or of the
    last step; the result names the best step either way."""
    from lmpipe.train.trainer import evaluate_loss

    train, val = markov_tokens(600, 32, seed=1), markov_tokens(2000, 32, seed=2)
    evals = eval_batches(val, 16, 8, None)
    assert sum(x.shape[0] for x, _ in evals) == (len(val) - 1) // 16   # the whole split
    model = tiny_transformer(vocab=32)
    cfg = tiny_train(max_steps=120, eval_every=10, lr=3e-2, min_lr=3e-2, weight_decay=0.0,
                     select=select)
    res = Trainer(model, cfg, batches=TokenBatches(train, 16, 8, seed=0), rt=CPU,
                  eval_batches=evals).fit()
    vals = [(h["val_loss"], h["step"]) for h in res.history if h["val_loss"] is not None]
    best_val, best_step = min(vals)
    assert (res.best_step, res.best_val_loss) == (best_step, best_val)
    assert best_step < 120 and res.final_val_loss == vals[-1][0] > best_val  # it overfits
    expected = (best_step, best_val) if select == "best" else (120, res.final_val_loss)
    assert (res.selected_step, res.val_loss) == expected
    assert evaluate_loss(model, evals, CPU) == pytest.approx(expected[1], abs=1e-6)


# ----------------------------------------------------------------------------- groups
def test_weight_decay_and_muon_groups():
    tied = tiny_transformer(tie=True)
    g = param_groups(tied)
    assert "embed.weight" in g.names["no_decay"]                  # embeddings never decay
    assert all(n.endswith("weight") for n in g.names["decay"])
    assert {"blocks.0.attn.qkv.weight", "blocks.1.mlp.proj.weight"} <= set(g.names["decay"])
    assert "norm.weight" in g.names["no_decay"] and "blocks.0.norm1.weight" in g.names["no_decay"]
    assert all(p.ndim >= 2 for p in g.decay) and not g.muon
    # each tensor exactly once (the tied head is the embedding)
    all_ids = [id(p) for p in g.decay + g.no_decay + g.muon]
    assert len(all_ids) == len(set(all_ids)) == len(list(tied.parameters()))

    untied = tiny_transformer(tie=False)
    g = param_groups(untied, use_muon=True)
    assert "head.weight" in g.names["decay"]                      # a plain matrix, on AdamW
    assert "embed.weight" in g.names["no_decay"]
    assert "blocks.0.attn.qkv.weight" in g.names["muon"]
    assert "blocks.1.mlp.fc.weight" in g.names["muon"]
    assert not any("norm" in n for n in g.names["muon"] + g.names["decay"])

    rnn = build_model("rnn", dict(vocab_size=32, cell="rnn", d_embed=16, d_hidden=24, n_layer=2))
    g = param_groups(rnn, use_muon=True)
    assert {"layers.0.W_h.weight", "layers.1.W_x.weight"} <= set(g.names["muon"])
    assert "layers.0.W_x.bias" in g.names["no_decay"] and "head.bias" in g.names["no_decay"]
    assert "head.weight" in g.names["decay"]


def test_muon_optimizer_trains():
    model = tiny_transformer(tie=False)
    toks = markov_tokens(3000, 32)
    cfg = tiny_train(optimizer="muon", max_steps=30, lr=2e-2, eval_every=30)
    t = Trainer(model, cfg, batches=TokenBatches(toks, 16, 8, seed=0), rt=CPU,
                eval_batches=eval_batches(toks, 16, 8, 1))
    assert [type(o).__name__ for o in t.optimizers] == ["AdamW", "Muon"]
    res = t.fit()
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"] - 0.5


def cpu_flags() -> set[str]:
    """The CPU's feature flags as the kernel reports them (x86 `flags`, arm64 `Features`)."""
    text = Path("/proc/cpuinfo").read_text()
    return set(re.search(r"^(?:flags|Features)\s*:(.*)$", text, re.M).group(1).split())


def test_precision_choice_on_cpu():
    """`auto` is bf16 exactly where the CPU has native bf16 instructions (x86: AVX512-BF16 or
    AMX-BF16; arm64: BF16), read here from the CPU's own flags, not from what torch says."""
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    native = bool(cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})
    assert resolve_precision("auto", cpu) is (torch.bfloat16 if native else None)


@pytest.mark.gpu
def test_precision_choice_on_cuda():
    """`auto` on a GPU: bf16 from compute capability 8.0 (Ampere) on, where it is native."""
    gpu = torch.device("cuda", 0)
    native = torch.cuda.get_device_capability(gpu) >= (8, 0)
    assert resolve_precision("auto", gpu) is (torch.bfloat16 if native else None)
    assert resolve_precision("fp32", gpu) is None


# ----------------------------------------------------------------------------- learning
def test_tiny_model_overfits_tiny_text():
    """A 2-layer Transformer learns a tiny text (one 40-token line, written 10 times) to a
    near-zero loss through the trainer (bf16 autocast where the CPU has it)."""
    rng = np.random.default_rng(0)
    text = np.tile(rng.permutation(np.arange(3, 43)), 10)
    model = tiny_transformer(vocab=48, T=16)
    cfg = tiny_train(max_steps=120, lr=1e-2, min_lr=1e-3, warmup_steps=10, weight_decay=0.0,
                     batch_size=16, eval_every=120, precision="auto")
    t = Trainer(model, cfg, batches=TokenBatches(text, 16, 16, seed=0), rt=None,
                eval_batches=eval_batches(text, 16, 16, 1))
    res = t.fit()
    assert res.history[0]["train_loss"] > 3.0
    assert res.train_loss < 0.05, res.train_loss
    assert res.val_loss < 0.05   # the eval windows are the same text


def test_grad_accumulation_equals_big_batch():
    toks = markov_tokens(4000, 32)
    grads = []
    for bs, accum in ((8, 1), (4, 2), (2, 4)):
        model = tiny_transformer()
        t = Trainer(model, tiny_train(batch_size=bs, grad_accum=accum),
                    batches=TokenBatches(toks, 16, bs, seed=3), rt=CPU)
        loss = t.accumulate_gradients()
        grads.append((loss, [p.grad.clone() for p in model.parameters()]))
    (l0, g0), *rest = grads
    for loss, g in rest:
        assert loss == pytest.approx(l0, rel=1e-5)
        for a, b in zip(g0, g):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_batches_are_split_across_ranks_without_changing_the_global_order():
    toks = np.arange(500)
    one = TokenBatches(toks, 8, 6, seed=1)
    ranks = [TokenBatches(toks, 8, 3, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(40):   # crosses several epochs
        x, y = one.next()
        parts = [r.next() for r in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts]))
        assert torch.equal(y, torch.cat([p[1] for p in parts]))
        assert torch.equal(x[:, 1:], y[:, :-1])              # targets are inputs shifted by one
    assert one.epoch >= 2


# ----------------------------------------------------------------------------- failures
class NaNAfter(torch.nn.Module):
    """Wraps a model; its loss turns NaN from the `bad_call`-th forward on."""

    def __init__(self, inner, bad_call):
        super().__init__()
        self.inner, self.bad_call, self.calls = inner, bad_call, 0
        self.config = inner.config

    def forward(self, idx, targets=None):
        logits, loss = self.inner(idx, targets)
        if targets is not None:
            self.calls += 1
            if self.calls >= self.bad_call:
                loss = loss * float("nan")
        return logits, loss


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
    toks = markov_tokens(3000, 32)
    model = NaNAfter(tiny_transformer(), bad_call=8)
    cfg = tiny_train(max_steps=20, checkpoint_every=3, eval_every=100)
    t = Trainer(model, cfg, batches=TokenBatches(toks, 16, 4, seed=0), rt=CPU,
                checkpoint_dir=tmp_path / "ckpt", fingerprint={"run": 1})
    with pytest.raises(NonFiniteLossError, match=r"at step 8\b") as info:
        t.fit()
    assert "step-00000006" in str(info.value)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-00000003", "step-00000006"]
    # the kept checkpoint is good: finite weights
    from safetensors.torch import load_file

    w = load_file(tmp_path / "ckpt" / "step-00000006" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in w.values())


# ----------------------------------------------------------------------------- the stages
METRIC_KEYS = {"train_loss", "val_loss", "val_ppl", "val_bpb", "params", "tokens_seen",
               "train_seconds", "tokens_per_second"}


@pytest.mark.parametrize("stage,model_dir", [("pretrain", "transformer"), ("rnn", "rnn")])
def test_stage_end_to_end(tmp_path, stage, model_dir):
    root = make_project(tmp_path / stage, {stage: {"train": {"max_steps": 12, "eval_every": 5,
                                                             "checkpoint_every": 5,
                                                             "threads": 1}}})
    proc = run_stage(stage, root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((root / "metrics" / f"{stage}.json").read_text())
    assert METRIC_KEYS <= set(metrics)
    assert metrics["tokens_seen"] > 0 and metrics["params"] > 0
    assert math.isfinite(metrics["val_bpb"]) and metrics["val_ppl"] > 1
    assert metrics["val_loss"] < math.log(64)   # learned something beyond uniform
    assert metrics["val_tokens"] == 1500
    csv = (root / "plots" / stage / "loss.csv").read_text().splitlines()
    assert csv[0] == "step,tokens,train_loss,val_loss,lr" and len(csv) == 13
    assert (root / "plots" / stage / "loss.png").stat().st_size > 1000
    cfg = json.loads((root / "data" / "models" / model_dir / "config.json").read_text())
    assert cfg["model_type"] == ("transformer" if stage == "pretrain" else "rnn")
    assert cfg["config"]["vocab_size"] == 64
    # the temperature fitted on val is in the published config, and it lowered the val loss
    assert cfg["config"]["temperature"] == pytest.approx(metrics["temperature"], abs=1e-6)
    assert metrics["temperature_val_loss_after"] <= metrics["temperature_val_loss_before"]
    assert "temperature" in proc.stderr
    ckpts = sorted(p.name for p in (root / "data" / "checkpoints" / stage).iterdir())
    assert ckpts == ["step-00000010", "step-00000012"]
    # run again: resumes at the final checkpoint, trains nothing, same weights
    weights = root / "data" / "models" / model_dir / "model.safetensors"
    before = safetensors_parts(weights)
    again = run_stage(stage, root)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stderr
    assert safetensors_parts(weights) == before


def test_a_temperature_in_params_is_kept_not_fitted(tmp_path):
    root = make_project(tmp_path, {"pretrain": {"model": {"temperature": 1.0},
                                                "train": {"max_steps": 4, "eval_every": 2,
                                                          "threads": 1}}})
    proc = run_stage("pretrain", root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((root / "metrics" / "pretrain.json").read_text())
    cfg = json.loads((root / "data" / "models" / "transformer" / "config.json").read_text())
    assert cfg["config"]["temperature"] == 1.0 and "temperature" not in metrics


@pytest.mark.parametrize("stage,overlay,key", [
    ("pretrain", {"pretrain": {"model": {"context_length": 0}}},
     "pretrain.model.context_length: must be >= 1"),
    ("rnn", {"rnn": {"train": {"lr": -1}}}, "rnn.train.lr"),
    ("pretrain", {"pretrain": {"train": {"min_lr": 1.0, "lr": 0.1}}}, "pretrain.train"),
    ("pretrain", {"pretrain": {"model": {"n_head": 3}}}, "n_head"),
    ("rnn", {"rnn": {"train": {"optimizer": "sgd"}}}, "rnn.train.optimizer"),
])
def test_stage_bad_params_exit_2_naming_the_key(tmp_path, stage, overlay, key):
    root = make_project(tmp_path, overlay)
    proc = run_stage(stage, root, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert key in proc.stderr
    assert "Traceback" not in proc.stderr


def test_stage_without_tokens_exits_2(tmp_path):
    root = make_project(tmp_path)
    for f in (root / "data" / "tokens").iterdir():
        f.unlink()
    proc = run_stage("pretrain", root, timeout=120)
    assert proc.returncode == 2 and "meta.json" in proc.stderr


def test_context_longer_than_the_data_exits_2(tmp_path):
    root = make_project(tmp_path, {"rnn": {"context_length": 5000}}, n_train=3000)
    proc = run_stage("rnn", root, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "train split has 3000 tokens" in proc.stderr


def test_stage_logs_to_mlflow(project, mlflow_uri):
    """Per-step train loss and lr, per-eval val loss and the final metrics reach MLflow."""
    from mlflow.tracking import MlflowClient

    from tests.helpers.trainer import make_project as mk

    mk(project, {"pretrain": {"train": {"max_steps": 6, "eval_every": 3, "log_every": 1,
                                        "threads": 1}},
                 "tracking": {"experiment": "trainer-test"}})
    proc = run_stage("pretrain", project, tracking=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(tracking_uri=mlflow_uri)
    exp = client.get_experiment_by_name("trainer-test")
    run = client.search_runs([exp.experiment_id])[0]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert steps[:6] == [1, 2, 3, 4, 5, 6]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")][:2] == [3, 6]
    assert len(client.get_metric_history(run.info.run_id, "lr")) >= 6
    assert "val_bpb" in run.data.metrics and run.data.params["pretrain.model.n_layer"] == "2"


FAULTS_CHILD = r"""
import resource, sys
import numpy as np, torch
from lmpipe.core.params import TrainParams
from lmpipe.core.profiles import profile_dict
from lmpipe.data.batches import TokenBatches
from lmpipe.models.store import build_model
from lmpipe.train.runtime import Runtime, setup_runtime
from lmpipe.train.trainer import Trainer
torch.manual_seed(0)
pre = profile_dict("default")["pretrain"]   # the default model at half depth and batch
model = build_model("transformer", {**pre["model"], "vocab_size": 1024, "n_layer": 2})
train = TrainParams(**{**pre["train"], "batch_size": 4, "max_steps": 100, "max_tokens": None,
                       "progress": False, "precision": "fp32"})
rt = setup_runtime("cpu", "fp32", 2) if sys.argv[1] == "stage" else Runtime(torch.device("cpu"), None)
tokens = np.random.default_rng(0).integers(0, 1024, size=256 * 4 * 16)
trainer = Trainer(model, train, rt=rt, batches=TokenBatches(tokens, 256, 4, seed=0))
for _ in range(3):
    trainer.train_step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    trainer.train_step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4)
"""


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="glibc's malloc: Linux only")
def test_training_steps_reuse_freed_memory_instead_of_faulting_it_back_in():
    """Every training process (setup_runtime) has malloc keep what a step frees: a steady-state
    step then takes few page faults, where glibc's own settings fault the step's activations
    back in from the OS every step (runtime.keep_freed_memory; measured 559 against 12,234)."""
    import subprocess
    import sys

    faults = {}
    for how in ("stage", "plain"):
        out = subprocess.run([sys.executable, "-c", FAULTS_CHILD, how], capture_output=True,
                             text=True, check=True, cwd=Path(__file__).resolve().parent.parent)
        faults[how] = float(out.stdout.split()[-1])
    assert faults["stage"] < 2000, faults
    assert faults["plain"] > 5 * max(faults["stage"], 100), faults

"""Checkpoints: round trip, pruning, refusal of other runs, and kill-and-resume == uninterrupted."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time

import numpy as np
import pytest
import torch

from lmpipe.data.batches import TokenBatches, eval_batches
from lmpipe.models.store import build_model
from lmpipe.train import checkpoint as ckpt
from lmpipe.train.runtime import Runtime
from lmpipe.train.trainer import Trainer
from tests.helpers.trainer import (
    PY,
    make_project,
    markov_tokens,
    safetensors_parts,
    stage_env,
    tiny_train,
)

CPU = Runtime(device=torch.device("cpu"), dtype=None, threads=1)


def tiny(dropout=0.0, T=16):
    torch.manual_seed(0)
    return build_model("transformer", dict(vocab_size=32, context_length=T, n_layer=2,
                                           n_head=2, d_model=32, dropout=dropout))


def weights_bytes(model, path):
    import safetensors.torch

    safetensors.torch.save_model(model, str(path))
    return path.read_bytes()


def test_round_trip_restores_weights_optimizer_rng_and_loader(tmp_path):
    toks = markov_tokens(3000, 32)
    model = tiny()
    t = Trainer(model, tiny_train(max_steps=4, checkpoint_every=100), rt=CPU,
                batches=TokenBatches(toks, 16, 4, seed=5), checkpoint_dir=tmp_path,
                fingerprint={"a": 1})
    t.fit()                                            # final checkpoint at step 4
    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    rng = ckpt.capture_rng()
    expect = (random.random(), np.random.rand(), torch.rand(3))
    path = ckpt.save_checkpoint(tmp_path, 4, model, t.optimizers,
                                {"loader": t.batches.state_dict(), "fingerprint": {"a": 1}},
                                [rng], keep=5)
    assert path.name == "step-00000004"
    assert {p.name for p in path.iterdir()} == {"model.safetensors", "optimizer.pt", "rng.pt",
                                                "state.json"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp left

    fresh = tiny()
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    t2 = Trainer(fresh, tiny_train(max_steps=4), rt=CPU,
                 batches=TokenBatches(toks, 16, 4, seed=5))
    state, rngs = ckpt.load_checkpoint(path, fresh, t2.optimizers)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    for o1, o2 in zip(t.optimizers, t2.optimizers):
        s1, s2 = o1.state_dict()["state"], o2.state_dict()["state"]
        assert s1.keys() == s2.keys()
        for k in s1:
            for name in s1[k]:
                assert torch.equal(torch.as_tensor(s1[k][name]), torch.as_tensor(s2[k][name]))
    t2.batches.load_state_dict(state["loader"])
    assert torch.equal(t.batches.next()[0], t2.batches.next()[0])
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    ckpt.restore_rng(rngs[0])
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expect[0] and got[1] == expect[1] and torch.equal(got[2], expect[2])


def test_keeps_only_the_last_k(tmp_path):
    model = tiny()
    opt = torch.optim.AdamW(model.parameters())
    for step in (10, 20, 30, 40):
        ckpt.save_checkpoint(tmp_path, step, model, [opt], {"fingerprint": {}},
                             [ckpt.capture_rng()], keep=2)
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["step-00000030", "step-00000040"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000040"
    # a half-written (temporary) folder is never mistaken for a checkpoint
    (tmp_path / ".step-00000050.abc.tmp").mkdir()
    (tmp_path / "step-00000060").mkdir()          # no state.json: incomplete
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000040"


def test_a_checkpoint_of_another_shape_is_refused(tmp_path):
    model = tiny()
    opt = torch.optim.AdamW(model.parameters())
    path = ckpt.save_checkpoint(tmp_path, 1, model, [opt], {"fingerprint": {}},
                                [ckpt.capture_rng()])
    other = build_model("transformer", dict(vocab_size=32, context_length=16, n_layer=2,
                                            n_head=2, d_model=64))
    with pytest.raises(ckpt.CheckpointError, match="does not fit this model"):
        ckpt.load_checkpoint(path, other, [torch.optim.AdamW(other.parameters())])


def test_checkpoints_of_other_params_are_set_aside_not_resumed(tmp_path, capsys):
    toks = markov_tokens(3000, 32)

    def trainer(lr, fp):
        return Trainer(tiny(), tiny_train(max_steps=6, lr=lr, checkpoint_every=3), rt=CPU,
                       batches=TokenBatches(toks, 16, 4, seed=0), checkpoint_dir=tmp_path,
                       fingerprint=fp)

    trainer(1e-2, {"train": {"lr": 1e-2}, "model": {"d": 32}}).fit()
    res = trainer(2e-2, {"train": {"lr": 2e-2}, "model": {"d": 32}}).fit()
    err = capsys.readouterr().err
    assert "not resuming" in err and "train.lr" in err and "model.d" not in err
    assert res.resumed_from is None and res.step == 6
    assert sorted(p.name for p in (tmp_path / "stale").iterdir()) == ["step-00000003",
                                                                      "step-00000006"]
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["step-00000003", "step-00000006"]
    assert ckpt.read_state(tmp_path / "step-00000006")["fingerprint"]["train"]["lr"] == 2e-2


@pytest.mark.parametrize("optimizer,precision,accum", [("adamw", "auto", 1), ("muon", "fp32", 2)])
def test_stop_and_resume_gives_byte_identical_weights(tmp_path, optimizer, precision, accum):
    """Stopping after step 7 (checkpoint at 6) then resuming ends exactly where a straight run
    ends: weights, optimizer moments, dropout RNG and batch order all carry over."""
    toks = markov_tokens(4000, 32)
    evals = eval_batches(toks, 16, 4, 1)

    def run(folder, stop=None):
        torch.manual_seed(0)
        model = tiny(dropout=0.1)
        cfg = tiny_train(max_steps=14, checkpoint_every=3, eval_every=4, optimizer=optimizer,
                         precision=precision, grad_accum=accum)
        rt = Runtime(torch.device("cpu"), torch.bfloat16 if precision == "auto" else None,
                     threads=1)
        t = Trainer(model, cfg, rt=rt, batches=TokenBatches(toks, 16, 4, seed=9),
                    eval_batches=evals, checkpoint_dir=folder, fingerprint={"x": 1},
                    stop_after_step=stop)
        res = t.fit()
        return model, res

    straight, res_a = run(tmp_path / "a")
    run(tmp_path / "b", stop=7)            # "killed" during step 8: the last checkpoint is 6
    torch.manual_seed(1234)                # a fresh process would not share our RNG state
    np.random.seed(99)
    resumed, res_b = run(tmp_path / "b")
    assert res_b.resumed_from == 6 and res_b.step == 14
    assert weights_bytes(straight, tmp_path / "a.st") == weights_bytes(resumed, tmp_path / "b.st")
    assert [h["train_loss"] for h in res_a.history] == [h["train_loss"] for h in res_b.history]
    assert res_a.val_loss == res_b.val_loss
    assert (res_a.best_step, res_a.best_val_loss) == (res_b.best_step, res_b.best_val_loss)


def _wait_for(path_glob_dir, proc, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if ckpt.checkpoint_dirs(path_glob_dir):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    return False


@pytest.mark.slow
def test_sigkill_of_the_pretrain_stage_then_rerun_equals_an_uninterrupted_run(tmp_path):
    """The real thing: SIGKILL `python -m stages.pretrain` (smoke profile) after its first
    checkpoint, run it again, and compare the final weights with an uninterrupted run's."""
    overlay = {"pretrain": {"model": {"dropout": 0.1},
                            "train": {"max_steps": 80, "checkpoint_every": 10, "eval_every": 20,
                                      "threads": 1}}}
    straight = make_project(tmp_path / "straight", overlay, n_train=20000)
    killed = make_project(tmp_path / "killed", overlay, n_train=20000)

    ok = subprocess.run([PY, "-m", "stages.pretrain"], cwd=straight, env=stage_env(straight),
                        capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0, ok.stderr[-3000:]

    proc = subprocess.Popen([PY, "-m", "stages.pretrain"], cwd=killed, env=stage_env(killed),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    folder = killed / "data" / "checkpoints" / "pretrain"
    try:
        assert _wait_for(folder, proc), "no checkpoint appeared before the run ended"
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "metrics" / "pretrain.json").exists()
    at_kill = [p.name for p in ckpt.checkpoint_dirs(folder)]
    assert at_kill and "step-00000080" not in at_kill

    again = subprocess.run([PY, "-m", "stages.pretrain"], cwd=killed, env=stage_env(killed),
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stderr
    a = safetensors_parts(straight / "data" / "models" / "transformer" / "model.safetensors")
    b = safetensors_parts(killed / "data" / "models" / "transformer" / "model.safetensors")
    assert a[0] == b[0]                                     # same tensors, shapes, offsets
    assert a[1] == b[1], "resumed weights differ from the uninterrupted run's"   # same bytes
    ma = json.loads((straight / "metrics" / "pretrain.json").read_text())
    mb = json.loads((killed / "metrics" / "pretrain.json").read_text())
    assert ma["val_loss"] == mb["val_loss"] and ma["tokens_seen"] == mb["tokens_seen"]
    ca = (straight / "plots" / "pretrain" / "loss.csv").read_text()
    cb = (killed / "plots" / "pretrain" / "loss.csv").read_text()
    assert ca == cb   # the loss history survives the kill too

"""Data parallelism on CPU: `torchrun --standalone --nproc_per_node=2` with the gloo backend.

Two processes with batch B read exactly the windows one process with batch 2B reads, and DDP
averages their gradients, so the two runs follow the same trajectory up to float rounding.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.trainer import PY, make_project, stage_env


def _overlay(batch_size, optimizer):
    # dropout 0: each rank draws its own masks, so only the maths without it can agree
    return {"pretrain": {"model": {"context_length": 32, "n_layer": 2, "n_head": 2,
                                   "d_model": 32, "dropout": 0.0},
                         "train": {"optimizer": optimizer, "batch_size": batch_size,
                                   "max_steps": 12, "eval_every": 6,
                                   "checkpoint_every": 6, "precision": "fp32", "threads": 1,
                                   "lr": 3e-3, "warmup_steps": 2, "progress": False}}}


@pytest.mark.slow
@pytest.mark.parametrize("optimizer,atol", [("adamw", 2e-5), ("muon", 1e-3)])
def test_torchrun_two_processes_matches_one_process_with_the_doubled_batch(tmp_path, optimizer,
                                                                            atol):
    """AdamW in fp32 follows the single-process run to float rounding; Muon's Newton-Schulz
    iterations run in bf16 and amplify the rounding differences a little (~0.3% here)."""
    ddp = make_project(tmp_path / "ddp", _overlay(4, optimizer))
    single = make_project(tmp_path / "single", _overlay(8, optimizer))
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "stages.pretrain"]
    proc = subprocess.run(cmd, cwd=ddp, env=stage_env(ddp), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "world size 2" in proc.stderr
    assert "the 2 DDP replicas hold identical weights" in proc.stderr
    one = subprocess.run([PY, "-m", "stages.pretrain"], cwd=single, env=stage_env(single),
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-4000:]

    m_ddp = json.loads((ddp / "metrics" / "pretrain.json").read_text())
    m_one = json.loads((single / "metrics" / "pretrain.json").read_text())
    assert m_ddp["tokens_seen"] == m_one["tokens_seen"] == 12 * 8 * 32
    assert m_ddp["val_loss"] == pytest.approx(m_one["val_loss"], rel=1e-3)
    rows = (ddp / "plots" / "pretrain" / "loss.csv").read_text().splitlines()[1:]
    losses = [float(r.split(",")[2]) for r in rows]
    assert losses[-1] < losses[0] - 0.1                         # it learns

    w_ddp = load_file(ddp / "data" / "models" / "transformer" / "model.safetensors")
    w_one = load_file(single / "data" / "models" / "transformer" / "model.safetensors")
    assert w_ddp.keys() == w_one.keys()
    for k in w_ddp:
        torch.testing.assert_close(w_ddp[k], w_one[k], rtol=1e-3, atol=atol, msg=k)
    # rank 0 alone wrote the checkpoints, and they hold both ranks' RNG states
    ck = ddp / "data" / "checkpoints" / "pretrain" / "step-00000012"
    rng = torch.load(ck / "rng.pt", weights_only=True)
    assert len(rng) == 2


@pytest.mark.slow
def test_nproc_param_relaunches_the_stage_under_torchrun(tmp_path):
    """`train.nproc_per_node: 2` in params is all it takes: the plain stage command (what
    `dvc repro` runs) re-launches itself under torchrun with DistributedDataParallel."""
    overlay = _overlay(4, "adamw")
    overlay["pretrain"]["train"].update(nproc_per_node=2, max_steps=4, eval_every=4,
                                        checkpoint_every=4)
    project = make_project(tmp_path / "p", overlay)
    proc = subprocess.run([PY, "-m", "stages.pretrain"], cwd=project, env=stage_env(project),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "launching 2 processes" in proc.stderr
    assert "world size 2" in proc.stderr
    metrics = json.loads((project / "metrics" / "pretrain.json").read_text())
    assert metrics["tokens_seen"] == 4 * 2 * 4 * 32   # steps x ranks x batch x context


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ddp_gradient_is_the_mean_over_ranks_with_plain_sgd(tmp_path):
    """Plain SGD, no clipping (tests/helpers/ddp_sgd.py): the weights move by lr x gradient,
    so two ranks must follow one process with the doubled batch step for step; a gradient
    summed over ranks, or scaled by any constant, would not."""
    from lmpipe.models.store import build_model
    from tests.helpers.ddp_sgd import CONFIG
    from tests.helpers.trainer import REPO

    env = stage_env(tmp_path)
    two = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "tests.helpers.ddp_sgd", str(tmp_path / "two.safetensors"), "4"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-4000:]
    assert "the 2 DDP replicas hold identical weights" in two.stderr
    one = subprocess.run([PY, "-m", "tests.helpers.ddp_sgd", str(tmp_path / "one.safetensors"),
                          "8"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-4000:]
    torch.manual_seed(0)
    init = build_model("transformer", CONFIG).state_dict()
    w_two, w_one = load_file(tmp_path / "two.safetensors"), load_file(tmp_path / "one.safetensors")
    assert w_two.keys() == w_one.keys() == init.keys()
    d_two = torch.cat([(w_two[k] - init[k]).flatten() for k in sorted(init)])
    d_one = torch.cat([(w_one[k] - init[k]).flatten() for k in sorted(init)])
    # A gradient off by a factor c moves the weights by about c times as much: the updates
    # must agree to a small fraction of their own size (float rounding only).
    assert float(d_one.norm()) > 0.1
    assert float((d_two - d_one).norm() / d_one.norm()) < 1e-4


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_input_error_under_torchrun_keeps_exit_code_2(tmp_path):
    """`train.nproc_per_node: 2` and no token files: each rank fails with InputError, and the
    stage command (what `dvc repro` and the flow run) exits 2, not torchrun's 1."""
    import shutil

    overlay = _overlay(4, "adamw")
    overlay["pretrain"]["train"].update(nproc_per_node=2, max_steps=4)
    project = make_project(tmp_path / "p", overlay)
    shutil.rmtree(project / "data" / "tokens")
    proc = subprocess.run([PY, "-m", "stages.pretrain"], cwd=project, env=stage_env(project),
                          capture_output=True, text=True, timeout=240)
    assert "launching 2 processes" in proc.stderr
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "data/tokens/meta.json: token files not found; run `dvc repro tokenizer`" in proc.stderr
    assert "rank 0 exited with 2" in proc.stderr or "rank 1 exited with 2" in proc.stderr

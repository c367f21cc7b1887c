"""What only an NVIDIA machine can check: bf16 training, torch.compile, cached generation and
DDP over NCCL on CUDA. Every test here is marked `gpu`: without a CUDA device they are
deselected and listed at the end of the run (tests/conftest.py), never counted as passed.
`benchmarks/gpu.sh` runs them, with the smoke pipeline on `device: cuda` and the benchmark.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist

from lmpipe.core.params import TrainParams
from lmpipe.data.batches import TokenBatches
from lmpipe.models.sampling import generate
from lmpipe.models.store import build_model
from lmpipe.train.runtime import Runtime, setup_runtime
from lmpipe.train.trainer import Trainer
from tests.helpers.trainer import PY, make_project, markov_tokens, stage_env

pytestmark = pytest.mark.gpu

V, CTX = 64, 64
CFG = dict(vocab_size=V, context_length=CTX, n_layer=2, n_head=4, d_model=128, dropout=0.0)


def cuda_trainer(compile: bool = False, steps: int = 60, seed: int = 0) -> Trainer:
    torch.manual_seed(seed)
    model = build_model("transformer", CFG)
    cfg = TrainParams(device="cuda", precision="bf16", compile=compile, optimizer="muon",
                      lr=3e-3, min_lr=3e-4, warmup_steps=5, batch_size=16, max_steps=steps,
                      eval_every=10_000, progress=False)
    rt = Runtime(torch.device("cuda", 0), torch.bfloat16)
    batches = TokenBatches(markov_tokens(40_000, V, seed=1), CTX, 16, seed=seed)
    return Trainer(model, cfg, batches=batches, rt=rt)


def test_cuda_bf16_training_learns_with_fp32_weights_and_fused_adamw():
    rt = setup_runtime("cuda", "auto", 0)
    assert rt.device.type == "cuda"
    assert rt.dtype == torch.bfloat16             # auto picks bf16 on every GPU since Ampere
    trainer = cuda_trainer()
    result = trainer.fit()
    losses = [h["train_loss"] for h in result.history]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.5      # it learns
    assert all(p.is_cuda and p.dtype == torch.float32 for p in trainer.model.parameters())
    adamw = [o for o in trainer.optimizers if isinstance(o, torch.optim.AdamW)]
    assert adamw and adamw[0].defaults["fused"] is True


def test_torch_compile_on_cuda_matches_eager_steps():
    eager, compiled = cuda_trainer(steps=8), cuda_trainer(compile=True, steps=8)
    assert compiled.train_model is not compiled.model           # really compiled
    a = [eager.train_step()[0] for _ in range(8)]
    b = [compiled.train_step()[0] for _ in range(8)]
    np.testing.assert_allclose(b, a, rtol=2e-2)
    assert b[-1] < b[0]


def test_cached_generation_equals_uncached_on_cuda():
    torch.manual_seed(0)
    model = build_model("transformer", CFG).cuda().eval()
    with torch.no_grad():                        # gain 2: greedy output is not one token
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 2 * p.shape[1] ** -0.5)
    prompt = [3, 1, 4, 1, 5]
    n = CTX - len(prompt) + 1                    # prompt + output fill the context exactly
    cached = generate(model, prompt, n, temperature=0.0, use_cache=True)
    plain = generate(model, prompt, n, temperature=0.0, use_cache=False)
    assert len(cached) == n and len(set(cached)) > 5
    assert cached == plain


def test_ddp_over_nccl_in_one_process_group_equals_the_plain_model():
    """NCCL initialises, DDP wraps a CUDA model and its gradient all-reduce leaves a
    one-rank step equal to the unwrapped model's."""
    with tempfile.NamedTemporaryFile() as store:
        dist.init_process_group("nccl", init_method=f"file://{store.name}", rank=0, world_size=1)
        try:
            torch.manual_seed(0)
            plain = build_model("transformer", CFG).cuda()
            twin = build_model("transformer", CFG).cuda()
            twin.load_state_dict(plain.state_dict())
            ddp = torch.nn.parallel.DistributedDataParallel(twin, device_ids=[0])
            idx = torch.randint(0, V, (4, CTX), device="cuda")
            plain(idx, idx)[1].backward()
            ddp(idx, idx)[1].backward()
            assert dist.get_backend() == "nccl"
            for (name, p), q in zip(plain.named_parameters(), twin.parameters()):
                torch.testing.assert_close(q.grad, p.grad, msg=name)
        finally:
            dist.destroy_process_group()


def test_pretrain_stage_under_torchrun_over_nccl(tmp_path):
    n = torch.cuda.device_count()
    if n < 2:
        pytest.skip(f"DDP across GPUs needs 2 CUDA devices; this machine has {n}")
    overlay = {"pretrain": {"model": {"context_length": 32, "n_layer": 2, "n_head": 2,
                                      "d_model": 64},
                            "train": {"device": "cuda", "batch_size": 4, "max_steps": 12,
                                      "eval_every": 6, "checkpoint_every": 6,
                                      "nproc_per_node": 2, "progress": False}}}
    project = make_project(tmp_path / "p", overlay)
    proc = subprocess.run([PY, "-m", "stages.pretrain"], cwd=project, env=stage_env(project),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "world size 2" in proc.stderr and "cuda" in proc.stderr
    assert "the 2 DDP replicas hold identical weights" in proc.stderr
    metrics = json.loads((project / "metrics" / "pretrain.json").read_text())
    assert metrics["tokens_seen"] == 12 * 2 * 4 * 32
    assert os.path.exists(project / "data" / "models" / "transformer" / "model.safetensors")

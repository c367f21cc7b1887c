"""The Trainer with plain SGD (no momentum, no clipping), alone or under torchrun.

    python -m tests.helpers.ddp_sgd OUT.safetensors BATCH               # one process
    python -m torch.distributed.run --standalone --nproc_per_node=2 \\
        -m tests.helpers.ddp_sgd OUT.safetensors BATCH                  # two ranks

AdamW, Muon and gradient clipping all cancel a constant factor on the gradient, so a DDP
that summed instead of averaged (or a loss scaled by the world size) would go unseen by runs
that use them. SGD moves each weight by lr x gradient: any such factor changes the result.
The optimizer is swapped in here, in the test's process, not in the library.
"""

from __future__ import annotations

import sys

import torch
from safetensors.torch import save_file

from lmpipe.data.batches import TokenBatches
from lmpipe.models.store import build_model
from lmpipe.train import trainer as trainer_module
from lmpipe.train.runtime import setup_runtime, teardown_runtime
from tests.helpers.trainer import markov_tokens, tiny_train

# dropout 0: each rank draws its own masks, and the test compares the gradient maths alone
CONFIG = dict(vocab_size=64, context_length=16, n_layer=1, n_head=2, d_model=32, dropout=0.0)
LR = 0.5


def plain_sgd(model, cfg, device):
    return [torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.0, weight_decay=0.0)]


def main(out: str, batch_size: int) -> None:
    trainer_module.build_optimizers = plain_sgd
    cfg = tiny_train(batch_size=batch_size, max_steps=5, lr=LR, min_lr=LR, warmup_steps=0,
                     grad_clip=0.0, eval_every=100, checkpoint_every=100, weight_decay=0.0)
    rt = setup_runtime("cpu", "fp32", 1)
    try:
        torch.manual_seed(0)
        model = build_model("transformer", CONFIG)
        batches = TokenBatches(markov_tokens(6000, 64), CONFIG["context_length"], batch_size,
                               seed=0, rank=rt.rank, world_size=rt.world_size)
        trainer = trainer_module.Trainer(model, cfg, batches=batches, rt=rt)
        assert [type(o).__name__ for o in trainer.optimizers] == ["SGD"]
        trainer.fit()
        if rt.is_main:
            save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
                      out)
    finally:
        teardown_runtime(rt)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))

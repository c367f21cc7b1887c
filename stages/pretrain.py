"""Stage `pretrain`: a decoder-only Transformer language model on the train tokens.

Reads  data/tokens/{train,val}.bin + meta.json and params `pretrain` (model + train).
Writes data/models/transformer/ (model.safetensors + config.json), resumable checkpoints in
       data/checkpoints/pretrain/ (persisted by DVC), plots/pretrain/loss.{csv,png} and
       metrics/pretrain.json; logs params, per-step metrics and the plots to MLflow.

Run it with `dvc repro pretrain`, `python -m stages.pretrain`, or on several processes with
`torchrun --nproc_per_node=N -m stages.pretrain` (DistributedDataParallel). Re-running after
a kill resumes from the newest checkpoint of the same params.
"""

from __future__ import annotations

import os

# Before torch loads: OpenMP threads that sleep at barriers instead of spinning. On a shared
# 2-core machine spinning threads starve each other (training steps measured 1.5-2x slower
# with the default policy); in no measurement here was PASSIVE slower. An explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from lmpipe.config import Params
from lmpipe.stage import main_for
from lmpipe.trainer import train_language_model

NAME = "pretrain"


def run(params: Params) -> dict:
    p = params.pretrain
    return train_language_model(
        NAME,
        model_type="transformer",
        model_params=p.model.model_dump(mode="json"),
        context_length=p.model.context_length,
        train_cfg=p.train,
        seed=params.seed,
        experiment=params.tracking.experiment,
        out_name="transformer",
        params_for_log={NAME: p.model_dump(mode="json"), "seed": params.seed},
    )


if __name__ == "__main__":
    main_for(NAME, run)

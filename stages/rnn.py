"""Stage `rnn`: a recurrent language model (Elman tanh RNN; LSTM/GRU by param).

Reads  data/tokens/{train,val}.bin + meta.json and params `rnn` (model, context_length, train).
Writes data/models/rnn/ (model.safetensors + config.json), resumable checkpoints in
       data/checkpoints/rnn/ (persisted by DVC), plots/rnn/loss.{csv,png} and
       metrics/rnn.json; logs params, per-step metrics and the plots to MLflow.

Training uses truncated backpropagation through time: windows of `rnn.context_length` tokens,
each from a zero state; the val figure scores the val split in the same windows.
Run it with `dvc repro rnn` or `python -m stages.rnn` (torchrun works as for pretrain).
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

NAME = "rnn"


def run(params: Params) -> dict:
    p = params.rnn
    return train_language_model(
        NAME,
        model_type="rnn",
        model_params=p.model.model_dump(mode="json"),
        context_length=p.context_length,
        train_cfg=p.train,
        seed=params.seed,
        experiment=params.tracking.experiment,
        out_name="rnn",
        params_for_log={NAME: p.model_dump(mode="json"), "seed": params.seed},
    )


if __name__ == "__main__":
    main_for(NAME, run)

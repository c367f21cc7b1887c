"""Stage `rnn`: a recurrent language model (Elman tanh RNN; LSTM or GRU by param).

    python -m stages.rnn     (dvc repro rnn; several processes: train.nproc_per_node)

Reads  data/tokens/{train,val}.bin + meta.json and params `rnn` (model, context_length,
       train), `seed`.
Writes data/models/rnn/ (model.safetensors + config.json), resumable checkpoints in
       data/checkpoints/rnn/ (persisted by DVC), plots/rnn/loss.{csv,png} and
       metrics/rnn.json; logs params, per-step metrics and the plots to MLflow.

Training is truncated backpropagation through time: windows of `rnn.context_length` tokens,
each from a zero state; the stage's val figure scores the val split in the same windows
(`evaluate` carries the state through the whole split instead). The model is
lmpipe/models/rnn.py; the loop is lmpipe/train/.
"""

from __future__ import annotations

import os

# Before torch loads: OpenMP threads that sleep at barriers instead of spinning (see
# stages/pretrain.py for the measurement).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from lmpipe.core.metric_logger import stage_logger  # noqa: E402
from lmpipe.core.params import Params  # noqa: E402
from lmpipe.core.paths import model_dir  # noqa: E402
from lmpipe.core.stage import main_for  # noqa: E402
from lmpipe.models.rnn import RNNLM  # noqa: E402
from lmpipe.train.language_model import (  # noqa: E402
    TokenData,
    fit_language_model,
    publish_language_model,
)
from lmpipe.train.runtime import seed_everything, training_runtime  # noqa: E402

NAME = "rnn"


def run(params: Params) -> dict:
    """The stage's work; returns its metrics (rank 0; {} on the other ranks)."""
    p = params.rnn
    with training_runtime(p.train) as rt, stage_logger(NAME, params.tracking.experiment) as log:
        log.log_params({NAME: p.model_dump(mode="json"), "seed": params.seed})
        data = TokenData.load()
        seed_everything(params.seed)
        model = RNNLM(p.model.with_vocab(data.vocab_size, f"{NAME}.model"))
        result = fit_language_model(NAME, model, p.train, data, context_length=p.context_length,
                                    seed=params.seed, rt=rt, logger=log)
        return publish_language_model(NAME, model, result, data, context_length=p.context_length,
                               out_dir=model_dir("rnn"), rt=rt, logger=log,
                               batch_size=p.train.batch_size)


if __name__ == "__main__":
    main_for(NAME, run)

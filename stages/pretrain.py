"""Stage `pretrain`: a decoder-only Transformer language model on the train tokens.

    python -m stages.pretrain     (dvc repro pretrain; several processes: train.nproc_per_node)

Reads  data/tokens/{train,val}.bin + meta.json and params `pretrain` (model + train), `seed`.
Writes data/models/transformer/ (model.safetensors + config.json), resumable checkpoints in
       data/checkpoints/pretrain/ (persisted by DVC), plots/pretrain/loss.{csv,png} and
       metrics/pretrain.json; logs params, per-step metrics and the plots to MLflow.

The model is lmpipe/models/transformer.py; the loop, its budget and checkpoints are
lmpipe/train/. Re-running after a kill resumes from the newest checkpoint of the same run.
"""

from __future__ import annotations

import os

# Before torch loads: OpenMP threads that sleep at barriers instead of spinning. On a shared
# 2-core machine spinning threads starve each other (training steps measured 1.5-2x slower
# with the default policy); in no measurement here was PASSIVE slower. An explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from lmpipe.core.metric_logger import stage_logger  # noqa: E402
from lmpipe.core.params import Params  # noqa: E402
from lmpipe.core.paths import model_dir  # noqa: E402
from lmpipe.core.stage import main_for  # noqa: E402
from lmpipe.models.transformer import Transformer  # noqa: E402
from lmpipe.train.language_model import (  # noqa: E402
    TokenData,
    fit_language_model,
    publish_language_model,
)
from lmpipe.train.runtime import seed_everything, training_runtime  # noqa: E402

NAME = "pretrain"


def run(params: Params) -> dict:
    """The stage's work; returns its metrics (rank 0; {} on the other ranks)."""
    p = params.pretrain
    with training_runtime(p.train) as rt, stage_logger(NAME, params.tracking.experiment) as log:
        log.log_params({NAME: p.model_dump(mode="json"), "seed": params.seed})
        data = TokenData.load()
        seed_everything(params.seed)
        model = Transformer(p.model.with_vocab(data.vocab_size, f"{NAME}.model"))
        context = p.model.context_length
        result = fit_language_model(NAME, model, p.train, data, context_length=context,
                                    seed=params.seed, rt=rt, logger=log)
        return publish_language_model(NAME, model, result, data, context_length=context,
                               out_dir=model_dir("transformer"), rt=rt, logger=log,
                               batch_size=p.train.batch_size)


if __name__ == "__main__":
    main_for(NAME, run)

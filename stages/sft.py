"""Stage `sft`: full finetuning of the pretrained Transformer on the instruction data.

    python -m stages.sft     (dvc repro sft)

Reads  data/models/transformer/, data/tokenizer/tokenizer.model,
       data/instruct/{train,val}.parquet (val is held out: scored, never trained on) and
       params `sft`, `seed`.
Writes data/models/sft/ (model.safetensors + config.json), resumable checkpoints in
       data/checkpoints/sft/ (persisted by DVC), plots/sft/loss.{csv,png} and metrics/sft.json
       (held-out response loss/ppl of the base and the finetuned model, counts of the
       truncation rule, trainable parameters, times); logs them and sampled answers
       (samples.md) to MLflow.

Every weight trains. The template and loss mask are lmpipe/tokenizer/chat_template.py and
lmpipe/finetune/examples.py; what SFT and LoRA share is lmpipe/finetune/tuning.py.
"""

from __future__ import annotations

from lmpipe.core.files import atomic_dir
from lmpipe.core.metric_logger import stage_logger
from lmpipe.core.names import WEIGHTS_FILE
from lmpipe.core.params import Params
from lmpipe.core.paths import model_dir
from lmpipe.core.stage import main_for
from lmpipe.finetune.tuning import finetune, model_info, prepare, publish_finetuned
from lmpipe.models.store import save_model
from lmpipe.train.runtime import training_runtime

NAME = "sft"


def run(params: Params) -> dict:
    """The stage's work; returns its metrics (rank 0; {} on the other ranks)."""
    p = params.sft
    with training_runtime(p.train) as rt, stage_logger(NAME, params.tracking.experiment) as log:
        log.log_params({NAME: p.model_dump(mode="json"), "seed": params.seed})
        base, data, before = prepare(NAME, p, params.seed, rt)
        model = base.model
        tuned = finetune(NAME, model, p, data, base, seed=params.seed, rt=rt, logger=log,
                         method={})
        extra: dict = {}
        if rt.is_main:
            with atomic_dir(model_dir(NAME)) as tmp:
                save_model(model, tmp, "transformer", model.config,
                           extra=model_info(NAME, p, base, tuned))
            extra["model_bytes"] = (model_dir(NAME) / WEIGHTS_FILE).stat().st_size
        return publish_finetuned(NAME, model, p, data, base, before, tuned, rt=rt, logger=log,
                                 seed=params.seed, extra_metrics=extra)


if __name__ == "__main__":
    main_for(NAME, run)

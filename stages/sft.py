"""Stage `sft`: full finetuning of the pretrained Transformer on the instruction data.

Reads  data/models/transformer/, data/tokenizer/tokenizer.model,
       data/instruct/{train,val}.parquet (val is held out: scored, never trained on) and
       params `sft`.
Writes data/models/sft/ (model.safetensors + config.json), resumable checkpoints in
       data/checkpoints/sft/ (persisted by DVC), plots/sft/loss.{csv,png} and metrics/sft.json
       (held-out response loss/ppl of the base and the finetuned model, counts of the
       truncation rule, trainable parameters, sizes, times); logs them and sampled answers
       (samples.md) to MLflow.

The template, the loss mask (response tokens only) and the batching are in lmpipe/instruct.py
and lmpipe/chat_template.py; training is the shared trainer (lmpipe/trainer.py).
"""

from __future__ import annotations

from lmpipe.config import Params
from lmpipe.instruct import finetune
from lmpipe.stage import main_for

NAME = "sft"


def run(params: Params) -> dict:
    return finetune(NAME, params.sft, seed=params.seed, experiment=params.tracking.experiment)


if __name__ == "__main__":
    main_for(NAME, run)

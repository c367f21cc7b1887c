"""Stage `lora`: low-rank adapters (peft LoRA) on the pretrained Transformer, base frozen.

Reads  data/models/transformer/, data/tokenizer/tokenizer.model,
       data/instruct/{train,val}.parquet (val is held out) and params `lora`.
Writes data/models/lora/adapter/ (PEFT format: adapter_config.json + adapter_model.safetensors,
       loadable with `PeftModel.from_pretrained`), data/models/lora/merged/ (the adapter folded
       into the base: model.safetensors + config.json, for `lmpipe.models.load_model`),
       checkpoints in data/checkpoints/lora/, plots/lora/loss.{csv,png} and metrics/lora.json
       (as sft's, plus adapter_bytes and merged_max_abs_diff); logs them and sampled answers
       to MLflow.

Adapters go on the attention projections (`lora.target_modules`), and on the MLP with
`lora.include_mlp: true`; rank, alpha and dropout are params (lmpipe/lora.py).
"""

from __future__ import annotations

from lmpipe.config import Params
from lmpipe.instruct import finetune
from lmpipe.stage import main_for

NAME = "lora"


def run(params: Params) -> dict:
    return finetune(NAME, params.lora, seed=params.seed, experiment=params.tracking.experiment)


if __name__ == "__main__":
    main_for(NAME, run)

"""Stage `lora`: low-rank adapters (peft LoRA) on the pretrained Transformer, base frozen.

    python -m stages.lora     (dvc repro lora)

Reads  data/models/transformer/, data/tokenizer/tokenizer.model,
       data/instruct/{train,val}.parquet (val is held out) and params `lora`, `seed`.
Writes data/models/lora/adapter/ (PEFT format: adapter_config.json +
       adapter_model.safetensors, loadable with `PeftModel.from_pretrained`),
       data/models/lora/merged/ (the adapter folded into the base: model.safetensors +
       config.json, what `evaluate`, `chat` and `generate` load), checkpoints in
       data/checkpoints/lora/, plots/lora/loss.{csv,png} and metrics/lora.json (as sft's,
       plus adapter_bytes and merged_max_abs_diff); logs them and sampled answers to MLflow.

Adapters go on the attention projections (`lora.target_modules`), and on the MLP with
`lora.include_mlp: true`; rank, alpha and dropout are params (lmpipe/finetune/lora.py).
What SFT and LoRA share is lmpipe/finetune/tuning.py.
"""

from __future__ import annotations

import torch

from lmpipe.core.files import atomic_dir
from lmpipe.core.metric_logger import stage_logger
from lmpipe.core.names import WEIGHTS_FILE
from lmpipe.core.params import Params
from lmpipe.core.paths import lora_adapter_dir, models_dir
from lmpipe.core.stage import main_for
from lmpipe.finetune.lora import add_lora, merge_checked, save_adapter, target_modules
from lmpipe.finetune.tuning import finetune, model_info, prepare, publish_finetuned
from lmpipe.models.store import save_model
from lmpipe.train.runtime import training_runtime

NAME = "lora"


def run(params: Params) -> dict:
    """The stage's work; returns its metrics (rank 0; {} on the other ranks)."""
    p = params.lora
    settings = {k: v for k, v in p.model_dump(mode="json").items()
                if k in ("r", "alpha", "dropout", "target_modules", "include_mlp")}
    out = models_dir() / NAME
    with training_runtime(p.train) as rt, stage_logger(NAME, params.tracking.experiment) as log:
        log.log_params({NAME: p.model_dump(mode="json"), "seed": params.seed})
        base, data, before = prepare(NAME, p, params.seed, rt)
        model = add_lora(base.model, p.r, p.alpha, p.dropout,
                         target_modules(p.target_modules, p.include_mlp),
                         param=f"{NAME}.target_modules")
        tuned = finetune(NAME, model, p, data, base, seed=params.seed, rt=rt, logger=log,
                         method=settings)
        extra: dict = {}
        if rt.is_main:   # two DVC outs, each published atomically: adapter/ and merged/
            extra["adapter_bytes"] = save_adapter(model, lora_adapter_dir())
            probe = data.val.examples[0].ids[: base.context_length]
            model, extra["merged_max_abs_diff"] = merge_checked(
                model, torch.tensor([probe], device=rt.device))
            with atomic_dir(out / "merged") as tmp:
                save_model(model, tmp, "transformer", model.config,
                           extra={**model_info(NAME, p, base, tuned), "lora": settings})
            extra["model_bytes"] = (out / "merged" / WEIGHTS_FILE).stat().st_size
        return publish_finetuned(NAME, model, p, data, base, before, tuned, rt=rt, logger=log,
                                 seed=params.seed, extra_metrics=extra)


if __name__ == "__main__":
    main_for(NAME, run)

"""What the `rnn` and `pretrain` stages share: a language model trained on the token files,
then published with its val figure, loss curves and metrics.

    data   = TokenData.load()                      data/tokens/{train,val}.bin, memory-mapped
    result = fit_language_model(...)               lmpipe/train/trainer.py, resumable; then the
                                                   temperature fitted on val (calibration.py)
    publish_language_model(...)                    rank 0: model folder, plots, metrics

The stage's val figure is the whole val split under the scoring convention of
docs/ARCHITECTURE.md ([EOS] + ids, non-overlapping windows of the context length, fp32),
the same code `evaluate` uses, so the two stages and `evaluate` cannot disagree.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from lmpipe.core.console import note
from lmpipe.core.metric_logger import MetricLogger
from lmpipe.core.names import MODEL_CONFIG_FILE
from lmpipe.core.paths import checkpoints_dir, plots_dir, tokens_dir
from lmpipe.core.records import write_metrics
from lmpipe.data.batches import TokenBatches, eval_batches
from lmpipe.data.tokens import load_tokens, tokens_meta
from lmpipe.evaluation.metrics import bits_per_byte, perplexity
from lmpipe.evaluation.neural import score_windows
from lmpipe.evaluation.plots import write_loss_plots
from lmpipe.models.store import count_parameters, model_type_of, save_model
from lmpipe.train.calibration import fit_temperature
from lmpipe.train.checkpoint import data_digest, run_fingerprint
from lmpipe.train.runtime import Runtime
from lmpipe.train.trainer import Trainer, TrainResult


@dataclass
class TokenData:
    """The train and val token streams (memory-mapped) and meta.json."""

    meta: dict
    train: np.ndarray
    val: np.ndarray

    @classmethod
    def load(cls) -> "TokenData":
        return cls(tokens_meta(), load_tokens("train"), load_tokens("val"))

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.meta["eos_id"])


def fit_language_model(stage: str, model: nn.Module, cfg, data: TokenData, *,
                       context_length: int, seed: int, rt: Runtime,
                       logger: MetricLogger) -> TrainResult:
    """Train `model` on windows of `context_length` tokens (cfg: a TrainParams section);
    resumes from data/checkpoints/<stage>/ when a checkpoint of this very run is there."""
    model_type = model_type_of(model)
    n_params = count_parameters(model)
    batches = TokenBatches(data.train, context_length, cfg.batch_size, seed, rt.rank,
                           rt.world_size, name="train")
    evals = eval_batches(data.val, context_length, cfg.batch_size, cfg.eval_batches, name="val")
    fingerprint = run_fingerprint(model_type, model.config.model_dump(mode="json"), cfg,
                                  context_length, seed, rt.world_size, data_digest(tokens_dir()))
    logger.log_params({"model_type": model_type, "params": n_params, "device": str(rt.device),
                       "precision": rt.precision, "world_size": rt.world_size,
                       "threads": rt.threads})
    note(f"{stage}: {model_type} with {n_params:,} parameters on {rt.device} ({rt.precision}, "
         f"{rt.threads} threads, world size {rt.world_size}); {len(data.train):,} train tokens")
    trainer = Trainer(model, cfg, batches=batches, eval_batches=evals, rt=rt, logger=logger,
                      checkpoint_dir=checkpoints_dir() / stage, fingerprint=fingerprint,
                      name=stage)
    result = trainer.fit()
    if model.config.temperature is None and evals:
        t0 = time.perf_counter()
        result.calibration = fit = fit_temperature(model, evals, rt)
        if fit is not None:
            model.config = model.config.model_copy(update={"temperature": fit.temperature})
            note(f"{stage}: temperature {fit.temperature:.4f} fitted on val in {fit.passes} passes "
                 f"({time.perf_counter() - t0:.1f} s): val loss {fit.loss_before:.4f} -> "
                 f"{fit.loss_after:.4f} nats/token on the selection windows")
    return result


def publish_language_model(stage: str, model: nn.Module, result: TrainResult, data: TokenData,
                           *, context_length: int, out_dir: Path, rt: Runtime,
                           logger: MetricLogger, batch_size: int = 8) -> dict:
    """Score the whole val split, write the model folder, the loss plots and
    metrics/<stage>.json; returns the metrics (rank 0 only: the other ranks return {})."""
    if not rt.is_main:
        return {}
    t0 = time.perf_counter()
    total_nll = score_windows(model.eval(), data.val, context_length, eos_id=data.eos_id,
                              batch_size=batch_size, dtype="float32")
    score_s = time.perf_counter() - t0
    n_val, val_bytes = int(len(data.val)), int(data.meta["splits"]["val"]["bytes"])
    n_params = count_parameters(model)
    metrics = {
        "train_loss": round(result.train_loss, 6),
        **result.selection_metrics(),
        **(result.calibration.metrics() if result.calibration is not None else {}),
        "val_loss": round(total_nll / n_val, 6),
        "val_ppl": round(perplexity(total_nll, n_val), 6),
        "val_bpb": round(bits_per_byte(total_nll, val_bytes), 6),
        "val_tokens": n_val,
        "val_bytes": val_bytes,
        "params": int(n_params),
        "steps": int(result.step),
        "tokens_seen": int(result.tokens_seen),
        "epochs": round(result.tokens_seen / max(1, len(data.train)), 4),
        "train_seconds": round(result.seconds, 3),
        "tokens_per_second": round(result.tokens_per_second, 1),
        "score_seconds": round(score_s, 3),
        "eval_seconds": round(result.eval_seconds, 3),
    }
    model_type = model_type_of(model)
    save_model(model, out_dir, model_type, model.config,
               extra={"context_length": int(context_length), "stage": stage,
                      "eos_id": data.eos_id, "trained_steps": int(result.step),
                      "tokens_seen": int(result.tokens_seen),
                      "selected_step": result.selected_step,
                      "stopped_by": result.stopped_by})
    plot_files = write_loss_plots(plots_dir(stage), result.history,
                                  title=f"{stage}: {model_type}, {n_params:,} params")
    written = write_metrics(stage, metrics)
    logger.log_metrics(written, step=result.step)
    logger.set_tags({"stopped_by": result.stopped_by, "selected_step": result.selected_step})
    for f in (*plot_files.values(), out_dir / MODEL_CONFIG_FILE):
        logger.log_artifact(f)
    note(f"{stage}: published the weights of step {metrics['selected_step']} of "
         f"{metrics['steps']} (stopped by {result.stopped_by}); val loss {metrics['val_loss']:.4f} nats/token, "
         f"{metrics['val_bpb']:.4f} bits/byte; {metrics['tokens_seen']:,} tokens in "
         f"{metrics['train_seconds']:.0f} s ({metrics['tokens_per_second']:,.0f} tok/s)")
    return written

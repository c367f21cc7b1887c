"""What the `sft` and `lora` stages share: the base model and the instruction examples in,
the shared trainer in the middle, held-out response scores, sampled answers and metrics out.

    base, data, before = prepare(stage, p, ...)   the base model and the templated, masked
                                                  examples; the base scored before training
    tuned = finetune(stage, model, ...)           lmpipe/train/trainer.py, resumable
    publish_finetuned(...)                        scores, answers, plots, metrics/<stage>.json

The held-out figure is the response perplexity of the val split (the same targets as
training: response, closing marker, EOS), measured for the base model and the finetuned one on
exactly the same tokens.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmpipe.core.console import note
from lmpipe.core.errors import InputError
from lmpipe.core.files import sha256_file
from lmpipe.core.metric_logger import MetricLogger
from lmpipe.core.names import IGNORE_INDEX, WEIGHTS_FILE
from lmpipe.core.paths import (
    checkpoints_dir,
    instruct_dir,
    model_dir,
    plots_dir,
    project_root,
)
from lmpipe.core.records import write_metrics
from lmpipe.data.corpus import read_instruct_rows
from lmpipe.evaluation.plots import write_loss_plots
from lmpipe.finetune.batches import InstructBatches, eval_batches, pad_batch
from lmpipe.finetune.examples import (
    Example,
    ExampleSet,
    build_examples,
    example_max_len,
)
from lmpipe.models.sampling import generate_reply
from lmpipe.models.store import count_parameters, load_model, trainable_summary
from lmpipe.tokenizer.model import Tokenizer
from lmpipe.train.checkpoint import run_fingerprint
from lmpipe.train.runtime import Runtime, seed_everything
from lmpipe.train.trainer import Trainer, TrainResult


# ----------------------------------------------------------------------------- inputs
@dataclass
class Base:
    """The pretrained Transformer every finetuning starts from, and the tokenizer."""

    model: nn.Module
    tok: Tokenizer
    folder: Path

    @property
    def context_length(self) -> int:
        return int(self.model.config.context_length)


def load_base() -> Base:
    tok = Tokenizer.load()
    folder = model_dir("transformer")
    model, _ = load_model(folder, device="cpu")
    if model.config.vocab_size != tok.vocab_size:
        raise InputError(f"{folder}: the model's vocabulary ({model.config.vocab_size}) is not "
                         f"the tokenizer's ({tok.vocab_size}); rerun `dvc repro pretrain`")
    return Base(model, tok, folder)


@dataclass
class InstructData:
    """Both instruction splits as examples under the truncation rule of
    lmpipe/finetune/examples.py, the rule itself, and the raw held-out rows."""

    train: ExampleSet
    val: ExampleSet
    val_rows: list[tuple[str, str]]
    rule: dict[str, Any]

    @classmethod
    def build(cls, stage: str, p, base: Base) -> "InstructData":
        """`p`: the stage's params (SftParams or LoraParams); errors name `stage`'s keys."""
        files = {s: instruct_dir() / f"{s}.parquet" for s in ("train", "val")}
        rows = {s: read_instruct_rows(f) for s, f in files.items()}
        rule = dict(max_len=example_max_len(p.max_seq_len, base.context_length),
                    system=p.system_prompt, overflow=p.overflow,
                    min_response_tokens=p.min_response_tokens, truncate_prompt=p.truncate_prompt)
        sets = {s: build_examples(base.tok, rows[s], **rule) for s in files}
        for s, got in sets.items():
            if not got.examples:
                raise InputError(
                    f"{files[s]}: every example was dropped by the truncation rule "
                    f"({stage}.max_seq_len={p.max_seq_len}, context_length="
                    f"{base.context_length}); raise {stage}.max_seq_len or set "
                    f"{stage}.truncate_prompt: true")
        return cls(sets["train"], sets["val"], rows["val"], rule)


# ----------------------------------------------------------------------------- scoring
@torch.no_grad()
def response_nll(model: nn.Module, examples: Sequence[Example], pad_id: int,
                 batch_size: int = 16, device: str | torch.device = "cpu",
                 autocast_dtype: torch.dtype | None = None) -> tuple[float, int]:
    """(total NLL in nats, number of scored targets) over the response parts of `examples`.

    The same targets as training (response, closing marker, EOS); padding and prompts are
    masked. Summed in fp32, so the result does not depend on the batch size.
    """
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
    total, count = 0.0, 0
    device = torch.device(device)
    try:
        for s in range(0, len(order), batch_size):
            x, y = pad_batch([examples[i] for i in order[s : s + batch_size]], pad_id)
            x, y = x.to(device), y.to(device)
            with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16,
                                enabled=autocast_dtype is not None):
                logits, _ = model(x)
            nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1),
                                  ignore_index=IGNORE_INDEX, reduction="sum")
            total += float(nll)
            count += int((y != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    return total, count


def response_metrics(model, examples, pad_id, prefix: str, **kw) -> dict[str, float]:
    """``{prefix}_response_loss`` (nats per response token) and ``{prefix}_response_ppl``."""
    total, n = response_nll(model, examples, pad_id, **kw)
    if n == 0:
        raise InputError("the held-out instruction split has no response tokens to score")
    loss = total / n
    return {f"{prefix}_response_loss": loss, f"{prefix}_response_ppl": math.exp(loss)}


def answers(model, tok, rows, p, seed: int, device) -> list[str]:
    """The model's answers to held-out prompts, as `lmpipe chat` would give them."""
    out = []
    for i, (prompt, _) in enumerate(rows):
        try:
            out.append(generate_reply(model, tok, prompt, system=p.system_prompt,
                                      max_new_tokens=p.sample_tokens,
                                      temperature=p.sample_temperature, seed=seed + i,
                                      device=device))
        except InputError as err:    # a prompt longer than the context
            out.append(f"(not asked: {err})")
    return out


@dataclass
class Before:
    """The base model on the held-out split, before any finetuning (rank 0 only)."""

    metrics: dict[str, float]
    answers: list[str]


def score_base(base: Base, data: InstructData, p, rt: Runtime, seed: int) -> Before:
    base.model.to(rt.device)
    if not rt.is_main:
        return Before({}, [])
    metrics = response_metrics(base.model, data.val.examples, base.tok.pad_id, "base_val",
                               batch_size=p.eval_batch_size, device=rt.device)
    return Before(metrics, answers(base.model, base.tok, data.val_rows[: p.samples], p, seed,
                                   rt.device))


def prepare(stage: str, p, seed: int, rt: Runtime) -> tuple[Base, InstructData, Before]:
    """The base model and the examples, and the base scored on the held-out split before any
    training; the generators are seeded again after scoring, so training starts from `seed`
    whatever the scoring drew."""
    base = load_base()
    data = InstructData.build(stage, p, base)
    seed_everything(seed)
    before = score_base(base, data, p, rt, seed)
    seed_everything(seed)
    return base, data, before


# ----------------------------------------------------------------------------- training
@dataclass
class Tuned:
    """A finished finetuning: the trainer's result, the batches it read (their counters are
    the tokens actually served) and the trainable share of the model."""

    result: TrainResult
    batches: InstructBatches
    trainable: dict[str, float]
    grad_accum: int


def finetune(stage: str, model: nn.Module, p, data: InstructData, base: Base, *, seed: int,
             rt: Runtime, logger: MetricLogger, method: dict[str, Any]) -> Tuned:
    """Train `model` (the base, or the base with adapters) on the train examples.

    `p.epochs` sets the step budget; `method` (the LoRA settings, or {} for full finetuning)
    is part of the run's fingerprint, so a checkpoint of the other method is never resumed.
    """
    cfg = p.train
    batches = InstructBatches(data.train.examples, cfg.batch_size, base.tok.pad_id, seed,
                              rank=rt.rank, world_size=rt.world_size)
    if p.epochs is not None:
        steps = max(1, math.ceil(p.epochs * batches.batches_per_epoch / cfg.grad_accum))
        cfg = cfg.model_copy(update={"max_steps": steps, "max_tokens": None})
    evals = eval_batches(data.val.examples, p.eval_batch_size, base.tok.pad_id, cfg.eval_batches)
    fingerprint = run_fingerprint(
        "transformer", model.config.model_dump(mode="json"), cfg, base.context_length, seed,
        rt.world_size,
        {"base": sha256_file(base.folder / WEIGHTS_FILE), "tokenizer": sha256_file(base.tok.path),
         "train": sha256_file(instruct_dir() / "train.parquet"), "rule": data.rule,
         "lora": method or None, "epochs": p.epochs})
    trainable = trainable_summary(model)
    logger.log_params({"device": str(rt.device), "precision": rt.precision,
                       "world_size": rt.world_size, "max_steps": cfg.max_steps,
                       "example_max_len": data.rule["max_len"],
                       "batching": "padded (one example per row, right padding)"})
    note(f"{stage}: {'LoRA' if method else 'full finetuning'} of {base.folder} "
         f"({trainable['trainable_params']:,} of {trainable['total_params']:,} parameters "
         f"trainable, {trainable['trainable_pct']:.2f}%) on {len(data.train.examples)} examples, "
         f"{cfg.max_steps} steps; {rt.device}, {rt.precision}")
    trainer = Trainer(model, cfg, batches=batches, eval_batches=evals, rt=rt, logger=logger,
                      checkpoint_dir=checkpoints_dir() / stage, fingerprint=fingerprint,
                      name=stage)
    return Tuned(trainer.fit(), batches, trainable, cfg.grad_accum)


def model_info(stage: str, p, base: Base, tuned: Tuned) -> dict[str, Any]:
    """What config.json records beside the finetuned weights (chat reads the system line)."""
    return {"stage": stage, "base": str(base.folder.relative_to(project_root())),
            "context_length": base.context_length, "eos_id": base.tok.eos_id,
            "chat_template": "lmpipe.tokenizer.chat_template.encode_chat",
            "system_prompt": p.system_prompt, "trained_steps": int(tuned.result.step),
            "selected_step": tuned.result.selected_step}


# ----------------------------------------------------------------------------- publishing
def samples_markdown(stage: str, rows, answers_by_model: dict[str, list[str]], p) -> str:
    how = (f"Sampling: {'greedy' if p.sample_temperature == 0 else f'temperature {p.sample_temperature}'}"
           f", at most {p.sample_tokens} new tokens, stopped at <|im_end|>.")
    lines = [f"# {stage}: answers to held-out prompts", "", how, ""]
    for i, (prompt, reference) in enumerate(rows):
        lines += [f"## {i + 1}. prompt", "", prompt, "", "**reference**", "", reference, ""]
        for who, texts in answers_by_model.items():
            lines += [f"**{who}**", "", texts[i] if texts[i].strip() else "(empty answer)", ""]
    return "\n".join(lines)


def publish_finetuned(stage: str, model: nn.Module, p, data: InstructData, base: Base,
                      before: Before, tuned: Tuned, *, rt: Runtime,
                      logger: MetricLogger, seed: int, extra_metrics: dict[str, Any]) -> dict:
    """Held-out scores and answers of the finetuned `model`, loss plots, metrics/<stage>.json
    (rank 0 only; the other ranks return {})."""
    if not rt.is_main:
        return {}
    t0 = time.perf_counter()
    metrics: dict[str, Any] = response_metrics(model, data.val.examples, base.tok.pad_id, "val",
                                               batch_size=p.eval_batch_size, device=rt.device)
    metrics.update(before.metrics)
    metrics["val_response_ppl_ratio"] = metrics["val_response_ppl"] / metrics["base_val_response_ppl"]
    rows = data.val_rows[: p.samples]
    tuned_answers = answers(model, base.tok, rows, p, seed, rt.device)
    result, batches, trainable = tuned.result, tuned.batches, tuned.trainable
    metrics.update({
        **extra_metrics,
        "train_loss": result.train_loss,
        **result.selection_metrics(),
        "params": int(count_parameters(base.model)),
        "trainable_params": int(trainable["trainable_params"]),
        "trainable_pct": trainable["trainable_pct"],
        "steps": int(result.step),
        "epochs": round(result.step * tuned.grad_accum / batches.batches_per_epoch, 4),
        **data.train.counts("train"), **data.val.counts("val"),
        "train_tokens_seen": int(batches.tokens_served),
        "train_response_tokens_seen": int(batches.response_tokens_served),
        "train_seconds": round(result.seconds, 3),
        "tokens_per_second": round(batches.tokens_served / result.seconds, 1)
        if result.seconds > 0 else 0.0,
        "eval_seconds": round(time.perf_counter() - t0, 3),
    })
    metrics = {k: (float(f"{v:.7g}") if isinstance(v, float) else v) for k, v in metrics.items()}
    plot_files = write_loss_plots(plots_dir(stage), result.history,
                                  title=f"{stage}: {trainable['trainable_params']:,} trainable params")
    written = write_metrics(stage, metrics)
    logger.log_metrics(written, step=result.step)
    logger.set_tags({"stopped_by": result.stopped_by, "selected_step": result.selected_step})
    logger.log_text(samples_markdown(stage, rows, {"base model": before.answers, stage: tuned_answers},
                                     p), "samples.md")
    for f in plot_files.values():
        logger.log_artifact(f)
    note(f"{stage}: held-out response ppl {metrics['base_val_response_ppl']:.3f} (base) -> "
         f"{metrics['val_response_ppl']:.3f}; {metrics['train_examples']} examples "
         f"({metrics['train_truncated']} truncated, {metrics['train_dropped']} dropped), "
         f"{metrics['steps']} steps in {metrics['train_seconds']:.1f} s")
    return written

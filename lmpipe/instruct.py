"""Instruction data for `sft` and `lora`: rows -> templated examples -> padded, masked batches.

Loss mask
---------
An example is the ids of `lmpipe.chat_template.encode_chat(tok, prompt, response)`. The model
reads ``ids[:-1]`` and predicts ``ids[1:]``; a target is kept only when it belongs to the
*response part* (the response tokens, the closing ``<|im_end|>`` and the final EOS). Targets in
the prompt part (EOS boundary, system and user turns, the assistant header) and padding are
-100, which `lm_loss` ignores. The loss of a batch is the mean over its kept targets.

Batches are padded, not packed
------------------------------
Each row of a batch is one example, padded on the right with ``<pad>`` (targets -100) to the
longest example of the batch. The model is causal, so right padding never changes the logits of
real positions, and no example attends to another: the loss of an example does not depend on
which examples share its batch (packing would either leak attention across examples or need a
block-diagonal mask). The instruction sets here are short, so the padding cost is small;
batches are cut from a length-sorted order within random chunks to keep it smaller still.

Truncation rule (counted in the metrics)
----------------------------------------
An example may hold at most ``max_len = min(max_seq_len, context_length + 1)`` ids (the model
reads all but the last). Let ``need = min(min_response_tokens, response length)``. A longer
example is

* **truncated** (``overflow: truncate``, the default) when its prompt part plus ``need``
  response tokens fit: the end of the response is cut off, closing marker included (such an
  example teaches the answer's start but not where it stops);
* else, with ``truncate_prompt: true``, **prompt-truncated** when the template without the
  user's text plus ``need`` fits: the end of the user's text is cut by just enough, then the
  response as above (for tiny smoke-test contexts; the question may lose its end);
* **dropped** otherwise, and always with ``overflow: drop``.

The counts (``*_examples``, ``*_truncated`` (any cut), ``*_prompt_truncated``, ``*_dropped``,
``*_response_tokens``) go to the stage's metrics for both splits. The held-out split follows
the same rule, so the base and the finetuned model are scored on exactly the same tokens.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from lmpipe.chat_template import DEFAULT_SYSTEM, encode_chat
from lmpipe.errors import InputError

IGNORE_INDEX = -100
COLUMNS = ("prompt", "response")


@dataclass
class Example:
    """One templated exchange: `ids` and the index where the response part starts."""

    ids: list[int]
    response_start: int
    truncated: bool = False

    @property
    def n_response_tokens(self) -> int:
        """Targets that count in the loss."""
        return len(self.ids) - self.response_start


@dataclass
class ExampleSet:
    examples: list[Example]
    rows: int = 0
    truncated: int = 0
    prompt_truncated: int = 0
    dropped: int = 0
    dropped_rows: list[int] = field(default_factory=list)

    @property
    def response_tokens(self) -> int:
        return sum(e.n_response_tokens for e in self.examples)

    @property
    def tokens(self) -> int:
        return sum(len(e.ids) for e in self.examples)

    def counts(self, split: str) -> dict[str, int]:
        """Metrics for this split: rows read, examples kept, truncated, dropped, tokens."""
        return {
            f"{split}_rows": self.rows,
            f"{split}_examples": len(self.examples),
            f"{split}_truncated": self.truncated,
            f"{split}_prompt_truncated": self.prompt_truncated,
            f"{split}_dropped": self.dropped,
            f"{split}_tokens": self.tokens,
            f"{split}_response_tokens": self.response_tokens,
        }


# ----------------------------------------------------------------------------- reading
def read_instruct(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(prompt, response) rows of data/instruct/<split>.parquet; bad rows raise InputError."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: instruction data not found; run `dvc repro download`")
    try:
        table = pq.read_table(path)
    except Exception as err:
        raise InputError(f"{path}: not a readable Parquet file ({err})") from None
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)} "
                         f"(columns: {', '.join(table.column_names)})")
    prompts = table.column("prompt").to_pylist()
    responses = table.column("response").to_pylist()
    rows = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        for name, v in (("prompt", p), ("response", r)):
            if not isinstance(v, str):
                raise InputError(f"{path}: row {i}: `{name}` is {v!r}, expected a string")
        if not r:
            raise InputError(f"{path}: row {i}: `response` is empty (nothing to learn)")
        rows.append((p, r))
    if not rows:
        raise InputError(f"{path}: no rows")
    return rows


def build_examples(tok, rows: Sequence[tuple[str, str]], max_len: int,
                   system: str | None = DEFAULT_SYSTEM, overflow: str = "truncate",
                   min_response_tokens: int = 1, truncate_prompt: bool = False) -> ExampleSet:
    """Template every row and apply the truncation rule of the module docstring."""
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    if overflow not in ("truncate", "drop"):
        raise ValueError(f"overflow must be 'truncate' or 'drop', got {overflow!r}")
    out = ExampleSet(examples=[], rows=len(rows))
    for i, (prompt, response) in enumerate(rows):
        chat = encode_chat(tok, prompt, response, system=system)
        ids, start = chat.ids, chat.response_start
        need = min(min_response_tokens, len(ids) - start)
        if len(ids) <= max_len:
            out.examples.append(Example(ids, start))
            continue
        if overflow == "truncate" and truncate_prompt and start + need > max_len:
            a, b = chat.user_span
            cut = start + need - max_len               # user tokens to remove
            if cut <= b - a:
                ids, start = ids[: b - cut] + ids[b:], start - cut
                out.prompt_truncated += 1
        if overflow == "truncate" and start + need <= max_len:
            out.examples.append(Example(ids[:max_len], start, truncated=True))
            out.truncated += 1
        else:
            out.dropped += 1
            out.dropped_rows.append(i)
    return out


def example_max_len(max_seq_len: int, context_length: int) -> int:
    """Ids an example may hold: the model reads all but the last, within its context."""
    return min(max_seq_len, context_length + 1)


# ----------------------------------------------------------------------------- batches
def inputs_and_targets(ex: Example) -> tuple[list[int], list[int]]:
    """Model input ids[:-1] and targets ids[1:], prompt-part targets set to -100."""
    ids = ex.ids
    targets = [t if j + 1 >= ex.response_start else IGNORE_INDEX for j, t in enumerate(ids[1:])]
    return ids[:-1], targets


def pad_batch(examples: Sequence[Example], pad_id: int,
              pad_to_multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), LongTensor [B, T]: right-padded with `pad_id` / -100."""
    pairs = [inputs_and_targets(e) for e in examples]
    T = max(len(x) for x, _ in pairs)
    T = int(math.ceil(T / pad_to_multiple) * pad_to_multiple)
    x = torch.full((len(pairs), T), pad_id, dtype=torch.long)
    y = torch.full((len(pairs), T), IGNORE_INDEX, dtype=torch.long)
    for b, (inp, tgt) in enumerate(pairs):
        x[b, : len(inp)] = torch.tensor(inp, dtype=torch.long)
        y[b, : len(tgt)] = torch.tensor(tgt, dtype=torch.long)
    return x, y


def epoch_order(n: int, batch_size: int, seed: int, epoch: int,
                lengths: Sequence[int] | None = None, chunk_batches: int = 16) -> list[list[int]]:
    """Batches of example indices for one epoch, a pure function of (seed, epoch).

    Shuffled; with `lengths`, each run of `chunk_batches` batches is sorted by length before
    it is cut, so a batch holds examples of similar length (less padding), and the batches are
    then shuffled again so long and short ones alternate.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    if lengths is not None:
        chunk = batch_size * chunk_batches
        parts = []
        for s in range(0, n, chunk):
            part = order[s : s + chunk]
            parts.append(part[np.argsort([lengths[i] for i in part], kind="stable")])
        order = np.concatenate(parts) if parts else order
    batches = [order[s : s + batch_size].tolist() for s in range(0, n, batch_size)]
    perm = rng.permutation(len(batches))
    return [batches[i] for i in perm]


class InstructBatches:
    """An endless, resumable stream of padded (inputs, targets) batches over epochs.

    The position is (epoch, batch index): `state_dict` / `load_state_dict` let a resumed run
    continue with exactly the batches an uninterrupted one would have seen. Under data
    parallelism each step cuts a global batch of ``batch_size * world_size`` examples and
    rank r takes the r-th slice (as `lmpipe.batches.TokenBatches` does). The counters of the
    tokens actually served travel with the state.
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, pad_id: int,
                 seed: int = 0, pad_to_multiple: int = 8, rank: int = 0, world_size: int = 1):
        if not examples:
            raise InputError("no training examples left after the truncation rule "
                             "(raise max_seq_len or use overflow: truncate)")
        self.examples = list(examples)
        self.batch_size = int(batch_size)
        self.pad_id = pad_id
        self.seed = seed
        self.pad_to_multiple = pad_to_multiple
        self.rank, self.world_size = int(rank), int(world_size)
        self.lengths = [len(e.ids) for e in self.examples]
        self.epoch = 0
        self.index = 0
        self.tokens_served = 0            # input positions of real (unpadded) examples
        self.response_tokens_served = 0   # targets that count in the loss
        self._order = self._make_order()

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.examples) / self.global_batch)

    @property
    def tokens_per_batch(self) -> int:
        """Mean input tokens of one global batch (the trainer's token counter; padding not
        counted). The exact counts are `tokens_served` / `response_tokens_served`."""
        mean = sum(self.lengths) / len(self.lengths) - 1
        return max(1, round(mean * min(self.global_batch, len(self.examples))))

    def _make_order(self) -> list[list[int]]:
        return epoch_order(len(self.examples), self.global_batch, self.seed, self.epoch,
                           self.lengths)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.index >= len(self._order):
            self.epoch += 1
            self.index = 0
            self._order = self._make_order()
        idx = self._order[self.index]
        self.index += 1
        for i in idx:
            self.tokens_served += self.lengths[i] - 1
            self.response_tokens_served += self.examples[i].n_response_tokens
        share = math.ceil(len(idx) / self.world_size)
        mine = idx[self.rank * share:(self.rank + 1) * share] or idx[-1:]
        return pad_batch([self.examples[i] for i in mine], self.pad_id, self.pad_to_multiple)

    next_batch = __next__ = next

    def __iter__(self):
        return self

    def epochs_done(self) -> float:
        return self.epoch + self.index / max(1, len(self._order))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed,
                "n_examples": len(self.examples), "tokens_served": self.tokens_served,
                "response_tokens_served": self.response_tokens_served}

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("n_examples", len(self.examples))) != len(self.examples):
            raise ValueError(f"loader state is for {state['n_examples']} examples, this loader "
                             f"has {len(self.examples)}")
        self.epoch = int(state["epoch"])
        self.index = int(state["index"])
        self.tokens_served = int(state.get("tokens_served", 0))
        self.response_tokens_served = int(state.get("response_tokens_served", 0))
        self._order = self._make_order()


def eval_batches(examples: Sequence[Example], batch_size: int, pad_id: int,
                 n_batches: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed padded batches of held-out examples (the trainer's periodic val loss)."""
    chosen = list(examples)
    if n_batches is not None and len(chosen) > batch_size * n_batches:
        step = len(chosen) / (batch_size * n_batches)
        chosen = [chosen[int(i * step)] for i in range(batch_size * n_batches)]
    chosen.sort(key=lambda e: len(e.ids))
    return [pad_batch(chosen[s:s + batch_size], pad_id) for s in range(0, len(chosen), batch_size)]


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def response_nll(model: torch.nn.Module, examples: Sequence[Example], pad_id: int,
                 batch_size: int = 16, device: str | torch.device = "cpu",
                 autocast_dtype: torch.dtype | None = None) -> tuple[float, int]:
    """(total NLL in nats, number of scored targets) over the response parts of `examples`.

    The same targets as training (response, closing marker, EOS); padding and prompts are
    masked. Summed in fp32, so the result does not depend on the batch size.
    """
    import torch.nn.functional as F

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


# ----------------------------------------------------------------------------- the stages' work
def _samples_text(stage: str, rows, answers: dict[str, list[str]], how: str) -> str:
    lines = [f"# {stage}: answers to held-out prompts", "", how, ""]
    for i, (prompt, reference) in enumerate(rows):
        lines += [f"## {i + 1}. prompt", "", prompt, "", "**reference**", "", reference, ""]
        for who, texts in answers.items():
            lines += [f"**{who}**", "", texts[i] if texts[i].strip() else "(empty answer)", ""]
    return "\n".join(lines)


def _answers(model, tok, rows, p, seed: int, device) -> list[str]:
    from lmpipe.chat_template import generate_reply

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


def finetune(stage: str, p, *, seed: int, experiment: str) -> dict:
    """The whole `sft` or `lora` stage (p: SftParams or LoraParams; LoRA when it has `r`).

    Reads data/models/transformer/, data/tokenizer/, data/instruct/{train,val}.parquet.
    Writes data/models/sft/ (full weights) or data/models/lora/{adapter,merged}/, resumable
    checkpoints in data/checkpoints/<stage>/, plots/<stage>/loss.{csv,png} and
    metrics/<stage>.json; logs params, curves, metrics and sampled answers to MLflow.
    Returns the metrics (rank 0; {} on other ranks).
    """
    import time

    from lmpipe import checkpoint as ckpt
    from lmpipe import lora as lora_lib
    from lmpipe import paths
    from lmpipe.io import atomic_dir, sha256_file
    from lmpipe.metrics import write_metrics
    from lmpipe.models import WEIGHTS_FILE, count_parameters, load_model, save_model
    from lmpipe.plots import write_loss_plots
    from lmpipe.stage import seed_everything
    from lmpipe.tokenizer import Tokenizer
    from lmpipe.tracking import NullLogger, stage_logger
    from lmpipe.trainer import Trainer, run_fingerprint, setup_runtime, teardown_runtime

    is_lora = hasattr(p, "r")
    cfg = p.train
    rt = setup_runtime(cfg.device, cfg.precision, cfg.threads)
    try:
        tok = Tokenizer.load()
        base_dir = paths.models_dir() / "transformer"
        model, _ = load_model(base_dir, device="cpu")
        mcfg = model.config
        if mcfg.vocab_size != tok.vocab_size:
            raise InputError(f"{base_dir}: the model's vocabulary ({mcfg.vocab_size}) is not the "
                             f"tokenizer's ({tok.vocab_size}); rerun `dvc repro pretrain`")
        train_file = paths.instruct_dir() / "train.parquet"
        val_file = paths.instruct_dir() / "val.parquet"
        train_rows, val_rows = read_instruct(train_file), read_instruct(val_file)
        max_len = example_max_len(p.max_seq_len, mcfg.context_length)
        rule = dict(max_len=max_len, system=p.system_prompt, overflow=p.overflow,
                    min_response_tokens=p.min_response_tokens,
                    truncate_prompt=p.truncate_prompt)
        train_set, val_set = build_examples(tok, train_rows, **rule), build_examples(tok, val_rows, **rule)
        for f, got in ((train_file, train_set), (val_file, val_set)):
            if not got.examples:
                raise InputError(
                    f"{f}: every example was dropped by the truncation rule "
                    f"({stage}.max_seq_len={p.max_seq_len}, context_length="
                    f"{mcfg.context_length}); raise {stage}.max_seq_len or set "
                    f"{stage}.truncate_prompt: true")
        score = dict(batch_size=p.eval_batch_size, device=rt.device)
        sample_rows = val_rows[: p.samples]
        how = (f"Sampling: {'greedy' if p.sample_temperature == 0 else f'temperature {p.sample_temperature}'}"
               f", at most {p.sample_tokens} new tokens, stopped at <|im_end|>.")
        seed_everything(seed)

        model.to(rt.device)
        base_metrics: dict[str, float] = {}
        answers: dict[str, list[str]] = {}
        if rt.is_main:   # the base model before any finetuning, on exactly the same tokens
            base_metrics = response_metrics(model, val_set.examples, tok.pad_id, "base_val", **score)
            answers["base model"] = _answers(model, tok, sample_rows, p, seed, rt.device)
        seed_everything(seed)

        n_base = count_parameters(model)
        if is_lora:
            targets = lora_lib.target_modules(p.target_modules, p.include_mlp)
            model = lora_lib.add_lora(model, p.r, p.alpha, p.dropout, targets,
                                      param=f"{stage}.target_modules")
        trainable = lora_lib.trainable_summary(model)

        batches = InstructBatches(train_set.examples, cfg.batch_size, tok.pad_id, seed,
                                  rank=rt.rank, world_size=rt.world_size)
        if p.epochs is not None:
            steps = max(1, math.ceil(p.epochs * batches.batches_per_epoch / cfg.grad_accum))
            cfg = cfg.model_copy(update={"max_steps": steps, "max_tokens": None})
        evals = eval_batches(val_set.examples, p.eval_batch_size, tok.pad_id, cfg.eval_batches)
        section = p.model_dump(mode="json")
        fingerprint = run_fingerprint(
            "transformer", mcfg.model_dump(mode="json"), cfg, mcfg.context_length, seed,
            rt.world_size,
            {"base": sha256_file(base_dir / WEIGHTS_FILE),
             "tokenizer": sha256_file(tok.path), "train": sha256_file(train_file),
             "rule": rule, "lora": {k: section[k] for k in
                                    ("r", "alpha", "dropout", "target_modules", "include_mlp")}
             if is_lora else None, "epochs": p.epochs})
        logger_cm = stage_logger(stage, experiment) if rt.is_main else NullLogger()
        with logger_cm as log:
            log.log_params({stage: section, "seed": seed, "device": str(rt.device),
                            "precision": rt.precision, "world_size": rt.world_size,
                            "max_steps": cfg.max_steps, "example_max_len": max_len,
                            "batching": "padded (one example per row, right padding)"})
            if rt.is_main:
                ckpt.note(f"{stage}: {'LoRA' if is_lora else 'full finetuning'} of "
                          f"{base_dir} ({trainable['trainable_params']:,} of "
                          f"{trainable['total_params']:,} parameters trainable, "
                          f"{trainable['trainable_pct']:.2f}%) on {len(train_set.examples)} "
                          f"examples, {cfg.max_steps} steps; {rt.device}, {rt.precision}")
            trainer = Trainer(model, cfg, batches=batches, eval_batches=evals, rt=rt, logger=log,
                              checkpoint_dir=paths.checkpoints_dir() / stage,
                              fingerprint=fingerprint, name=stage)
            result = trainer.fit()
            if not rt.is_main:
                return {}
            model.eval()
            t0 = time.perf_counter()
            metrics: dict[str, float | int] = {}
            metrics.update(response_metrics(model, val_set.examples, tok.pad_id, "val", **score))
            metrics.update(base_metrics)
            metrics["val_response_ppl_ratio"] = (metrics["val_response_ppl"]
                                                 / metrics["base_val_response_ppl"])

            out_dir = paths.models_dir() / stage
            extra = {"stage": stage, "base": str(base_dir.relative_to(paths.project_root())),
                     "context_length": mcfg.context_length, "eos_id": tok.eos_id,
                     "chat_template": "lmpipe.chat_template.encode_chat",
                     "system_prompt": p.system_prompt, "trained_steps": int(result.step)}
            if is_lora:   # two DVC outs, each published atomically: adapter/ and merged/
                adapter_bytes = lora_lib.save_adapter(model, out_dir / "adapter")
                probe = evals[0][0].to(rt.device)
                with torch.no_grad():
                    before = model(probe)[0].float()
                model = lora_lib.merge(model)
                with torch.no_grad():
                    after = model(probe)[0].float()
                with atomic_dir(out_dir / "merged") as tmp:
                    save_model(model, tmp, "transformer", model.config,
                               extra={**extra, "lora": {k: section[k] for k in (
                                   "r", "alpha", "dropout", "target_modules", "include_mlp")}})
                metrics["adapter_bytes"] = adapter_bytes
                metrics["merged_max_abs_diff"] = float((after - before).abs().max())
                metrics["model_bytes"] = (out_dir / "merged" / WEIGHTS_FILE).stat().st_size
            else:
                with atomic_dir(out_dir) as tmp:
                    save_model(model, tmp, "transformer", model.config, extra=extra)
                metrics["model_bytes"] = (out_dir / WEIGHTS_FILE).stat().st_size
            answers[stage] = _answers(model, tok, sample_rows, p, seed, rt.device)
            eval_s = time.perf_counter() - t0

            metrics.update({
                "train_loss": result.train_loss,
                "params": int(n_base),
                "trainable_params": int(trainable["trainable_params"]),
                "trainable_pct": trainable["trainable_pct"],
                "steps": int(result.step),
                "epochs": round(result.step * cfg.grad_accum / batches.batches_per_epoch, 4),
                **train_set.counts("train"), **val_set.counts("val"),
                "train_tokens_seen": int(batches.tokens_served),
                "train_response_tokens_seen": int(batches.response_tokens_served),
                "train_seconds": round(result.seconds, 3),
                "tokens_per_second": round(batches.tokens_served / result.seconds, 1)
                if result.seconds > 0 else 0.0,
                "eval_seconds": round(eval_s, 3),
            })
            metrics = {k: (float(f"{v:.7g}") if isinstance(v, float) else v)
                       for k, v in metrics.items()}
            plot_files = write_loss_plots(paths.plots_dir(stage), result.history,
                                          title=f"{stage}: {trainable['trainable_params']:,} "
                                          "trainable params")
            written = write_metrics(stage, metrics)
            log.log_metrics(written, step=result.step)
            log.log_text(_samples_text(stage, sample_rows, answers, how), "samples.md")
            for f in plot_files.values():
                log.log_artifact(f)
            ckpt.note(f"{stage}: held-out response ppl {metrics['base_val_response_ppl']:.3f} "
                      f"(base) -> {metrics['val_response_ppl']:.3f}; "
                      f"{metrics['train_examples']} examples ({metrics['train_truncated']} "
                      f"truncated, {metrics['train_dropped']} dropped), {metrics['steps']} steps "
                      f"in {metrics['train_seconds']:.1f} s")
            return written
    finally:
        teardown_runtime(rt)

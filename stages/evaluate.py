"""Stage `evaluate`: every model on the same held-out text (the val and test splits, scored
the same way), one table, the course's order checked, a report card.

Reads  data/models/{ngram,rnn,transformer,sft,lora}/, data/tokenizer/, data/tokens/, the
       training stages' metrics/*.json and plots/*/loss.csv, data/corpus/source.json,
       metrics/download.json; params `evaluate`.
Writes metrics/evaluate.json (nested, one entry per model: `dvc metrics show` lists
       `transformer.test_bpb`, `transformer.val_bpb` etc.), plots/evaluate/bits_per_byte.csv
       (each model's val and test bits per byte, a DVC plot), reports/report.md +
       reports/*.png; logs the metrics as `<model>.<metric>`, the report and the plots to
       MLflow.
How each model is scored (windows, stride, the RNN's carried state): lmpipe/evaluation/.
"""

from __future__ import annotations

from pathlib import Path

from lmpipe.core.errors import InputError
from lmpipe.core.metric_logger import flatten, stage_logger
from lmpipe.core.names import (
    CHAT_MODELS,
    LOSS_CSV,
    MODEL_CONFIG_FILE,
    MODEL_STAGE,
    SOURCE_FILE,
)
from lmpipe.core.params import EvaluateParams, Params
from lmpipe.core.paths import (
    corpus_dir,
    metrics_path,
    model_dir,
    plots_dir,
    reports_dir,
)
from lmpipe.core.records import (
    read_json,
    read_loss_csv,
    read_stage_metrics,
    write_csv,
    write_metrics,
)
from lmpipe.core.stage import main_for
from lmpipe.data.tokens import tokens_meta
from lmpipe.evaluation.model_card import describe_model
from lmpipe.evaluation.report import ReportData, environment_info, write_report
from lmpipe.evaluation.scoring import (
    ids_and_bytes,
    load_for_scoring,
    pick_device,
    score_ids,
)
from lmpipe.models.sampling import generate, generate_text
from lmpipe.models.store import load_model
from lmpipe.ngram.sampling import generate_ids
from lmpipe.ngram.store import is_ngram_folder, load_ngram
from lmpipe.tokenizer.chat_template import encode_chat, stop_ids
from lmpipe.tokenizer.model import Tokenizer

NAME = "evaluate"
SPLIT = "test"   # the headline split (lmpipe/tracking/registry.py reads test_bpb)
SPLITS = ("val", SPLIT)   # both scored here the same way: the family's order is checked on each
# Metrics copied from the finetuning stages' own files (they own the instruction data).
TUNED_KEYS = ("val_response_ppl", "base_val_response_ppl", "val_response_ppl_ratio",
              "val_response_loss", "base_val_response_loss", "trainable_params", "trainable_pct")


def model_folders(models: list[str]) -> dict[str, Path]:
    """Each model's folder; every missing one is named, with the stage that makes it."""
    folders, missing = {}, []
    for m in models:
        folder = model_dir(m)
        if not ((folder / MODEL_CONFIG_FILE).exists() or is_ngram_folder(folder)):
            missing.append(f"{m} ({folder}; run `dvc repro {MODEL_STAGE[m]}`)")
        folders[m] = folder
    if missing:
        raise InputError("trained model(s) not found: " + ", ".join(missing)
                         + "; or list only the trained ones in evaluate.models")
    return folders


def score_models(p: EvaluateParams, folders: dict[str, Path], device: str, tok) -> dict[str, dict]:
    splits = {split: ids_and_bytes(split, p.max_tokens, tok) for split in SPLITS}
    results = {}
    for m, folder in folders.items():
        loaded = load_for_scoring(folder, device=device, rnn_context=p.rnn_context)
        results[m] = {}
        for split, (ids, n_bytes) in splits.items():   # test last: its speed is the one kept
            score = score_ids(loaded, ids, n_bytes, eos_id=tok.eos_id,
                              stride=p.stride, batch_size=p.batch_size,
                              rnn_chunk=p.rnn_chunk, dtype=p.dtype, progress=True,
                              desc=f"evaluate {m} {split}")
            results[m].update(score.metrics(split))
            print(f"evaluate: {m:<12} {split:<4} ppl {score.ppl:10.3f}  bpb {score.bpb:.4f}  "
                  f"({score.n_tokens} tokens, {score.tokens_per_second:,.0f} tok/s, {score.dtype})")
        del loaded   # free one model before loading the next
    return results


def generate_samples(p: EvaluateParams, folders: dict[str, Path], device: str, tok,
                     seed: int) -> dict[str, list[tuple[str, str]]]:
    """A few continuations per model; SFT/LoRA are asked through the chat template."""
    out: dict[str, list[tuple[str, str]]] = {}
    if p.samples_per_model == 0:
        return out
    for m, folder in folders.items():
        chat = m in CHAT_MODELS
        prompts = p.instruct_prompts if chat else p.sample_prompts
        samples = []
        for i in range(p.samples_per_model):
            prompt = prompts[i % len(prompts)]
            kw = dict(max_new_tokens=p.sample_tokens, temperature=p.temperature,
                      top_k=p.top_k, seed=seed + i)
            try:
                if m == "ngram":
                    text = _ngram_sample(folder, prompt, tok, **kw)
                elif chat:
                    text = _chat_sample(folder, prompt, tok, device, **kw)
                else:
                    text = generate_text(folder, prompt, device=device, **kw)
            except InputError as err:   # e.g. a prompt longer than a small model's context
                text = f"[no sample: {err}]"
            samples.append((prompt, text))
        out[m] = samples
    return out


def _ngram_sample(folder: Path, prompt: str, tok, **kw) -> str:
    """Prompt + continuation, like lmpipe.ngram.sampling.generate_text with the stage's tokenizer."""
    prompt_ids = list(tok.encode(prompt))
    new = generate_ids(load_ngram(folder), prompt_ids, kw["max_new_tokens"],
                       kw["temperature"], kw["top_k"], kw["seed"])
    return tok.decode(prompt_ids + new)


def _chat_sample(folder: Path, prompt: str, tok, device: str, **kw) -> str:
    model, _ = load_model(folder, device=device)
    new = generate(model, encode_chat(tok, prompt).ids, stop_ids=stop_ids(tok), device=device, **kw)
    return tok.decode(new)


def run(params: Params) -> None:
    p = params.evaluate
    folders = model_folders(list(dict.fromkeys(p.models)))
    tok = Tokenizer.load()
    device = pick_device(p.device)
    with stage_logger(NAME, params.tracking.experiment) as log:
        log.log_params({NAME: p.model_dump(mode="json"), "device": device})
        results = score_models(p, folders, device, tok)
        stage_metrics = {m: read_stage_metrics(MODEL_STAGE[m]) for m in folders}
        for m in CHAT_MODELS:
            if m in results:
                results[m].update({k: stage_metrics[m][k] for k in TUNED_KEYS
                                   if isinstance(stage_metrics[m].get(k), (int, float))})
        write_metrics(NAME, results)
        log.log_metrics(flatten(results))
        # The bits-per-byte chart of `dvc plots show` / `dvc plots diff` (dvc.yaml: bits_per_byte)
        write_csv(plots_dir(NAME) / "bits_per_byte.csv", ("model", "val_bpb", "test_bpb"),
                  [{"model": m, "val_bpb": results[m].get("val_bpb"),
                    "test_bpb": results[m].get("test_bpb")} for m in folders])

        curves = {}
        for m in folders:
            csv_path = plots_dir(MODEL_STAGE[m]) / LOSS_CSV
            if m != "ngram" and csv_path.exists():
                curves[m] = read_loss_csv(csv_path)
        scoring = ("Transformers: sliding windows, stride half the context length (every token "
                   "reads at least that many before it)" if p.stride is None
                   else f"Transformers: sliding windows, stride {p.stride}")
        scoring += ("; the RNN carries its hidden state through the whole split."
                    if p.rnn_context is None else
                    f"; the RNN reads windows of {p.rnn_context} tokens from a zero state.")
        if p.max_tokens is not None:
            scoring += (f" Only {p.max_tokens} tokens of each split are scored: whole documents "
                        "drawn by a fixed permutation, the same for every model.")
        data = ReportData(
            results=results,
            stage_metrics=stage_metrics,
            loss_curves=curves,
            samples=generate_samples(p, folders, device, tok, params.seed),
            environment=environment_info(device),
            source=read_json(corpus_dir() / SOURCE_FILE),
            download_metrics=read_stage_metrics("download"),
            tokens_meta=tokens_meta(),
            split=SPLIT,
            scoring=scoring,
            descriptions={m: describe_model(m) for m in folders},
        )
        files = write_report(reports_dir(), data)
        for f in files.values():
            log.log_artifact(f, "report")
        log.log_artifact(metrics_path(NAME), "metrics")
    print(f"evaluate: wrote {metrics_path(NAME)} and {files['report']}")


if __name__ == "__main__":
    main_for(NAME, run)

"""Stage `evaluate`: every model on the same held-out split, one table, a report card.

Reads  data/models/{ngram,rnn,transformer,sft,lora}/, data/tokenizer/, data/tokens/, the
       training stages' metrics/*.json and plots/*/loss.csv, data/corpus/source.json,
       metrics/download.json; params `evaluate`.
Writes metrics/evaluate.json (nested, one entry per model: `dvc metrics show` lists
       `transformer.test_bpb` etc.), reports/report.md + reports/*.png; logs the metrics as
       `<model>.<metric>`, the report and the plots to MLflow.
How each model is scored (windows, stride, the RNN's carried state): lmpipe/evaluation.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmpipe import paths
from lmpipe.config import EvaluateParams, Params
from lmpipe.errors import InputError
from lmpipe.evaluation import (
    ids_and_bytes, is_ngram_dir, load_for_scoring, pick_device, resolve_model_dir, score_ids,
)
from lmpipe.metrics import write_metrics
from lmpipe.report import STAGE_OF, ReportData, environment_info, read_loss_csv, write_report
from lmpipe.stage import main_for
from lmpipe.tracking import flatten, stage_logger

NAME = "evaluate"
SPLIT = "test"   # metrics keys test_ppl, test_bpb, ... (lmpipe/registry.py reads test_bpb)
# Metrics copied from the finetuning stages' own files (they own the instruction data).
TUNED_KEYS = ("val_response_ppl", "base_val_response_ppl", "val_response_ppl_ratio",
              "val_response_loss", "base_val_response_loss", "trainable_params", "trainable_pct")


def reports_dir() -> Path:
    return paths.project_root() / "reports"


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except ValueError as err:
        raise InputError(f"{path}: not valid JSON ({err})") from None
    return data if isinstance(data, dict) else {}


def model_folders(models: list[str]) -> dict[str, Path]:
    """Each model's folder; every missing one is named, with the stage that makes it."""
    folders, missing = {}, []
    for m in models:
        folder = resolve_model_dir(paths.models_dir() / m)
        if not ((folder / "config.json").exists() or is_ngram_dir(folder)):
            missing.append(f"{m} ({paths.models_dir() / m}; run `dvc repro {STAGE_OF[m]}`)")
        folders[m] = folder
    if missing:
        raise InputError("trained model(s) not found: " + ", ".join(missing)
                         + "; or list only the trained ones in evaluate.models")
    return folders


def score_models(p: EvaluateParams, folders: dict[str, Path], device: str, tok) -> dict[str, dict]:
    ids, n_bytes = ids_and_bytes(SPLIT, p.max_tokens, tok)
    results = {}
    for m, folder in folders.items():
        loaded = load_for_scoring(folder, device=device, rnn_context=p.rnn_context)
        stride = p.stride if loaded.kind == "transformer" or p.rnn_context else None
        score = score_ids(loaded, ids, n_bytes, eos_id=tok.eos_id, stride=stride,
                          batch_size=p.batch_size, rnn_chunk=p.rnn_chunk, dtype=p.dtype,
                          progress=True, desc=f"evaluate {m}")
        results[m] = score.metrics(SPLIT)
        print(f"evaluate: {m:<12} {SPLIT} ppl {score.ppl:10.3f}  bpb {score.bpb:.4f}  "
              f"({score.n_tokens} tokens, {score.tokens_per_second:,.0f} tok/s)")
        del loaded   # free one model before loading the next
    return results


def generate_samples(p: EvaluateParams, folders: dict[str, Path], device: str, tok,
                     seed: int) -> dict[str, list[tuple[str, str]]]:
    """A few continuations per model; SFT/LoRA are asked through the chat template."""
    out: dict[str, list[tuple[str, str]]] = {}
    if p.samples_per_model == 0:
        return out
    for m, folder in folders.items():
        chat = m in ("sft", "lora")
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
                    from lmpipe.sampling import generate_text

                    text = generate_text(folder, prompt, device=device, **kw)
            except InputError as err:   # e.g. a prompt longer than a small model's context
                text = f"[no sample: {err}]"
            samples.append((prompt, text))
        out[m] = samples
    return out


def _ngram_sample(folder: Path, prompt: str, tok, **kw) -> str:
    """Prompt + continuation, like lmpipe.ngram.generate_text but with the stage's tokenizer."""
    from lmpipe.ngram import NgramModel, generate_ids

    prompt_ids = list(tok.encode(prompt))
    new = generate_ids(NgramModel.load(folder), prompt_ids, kw["max_new_tokens"],
                       kw["temperature"], kw["top_k"], kw["seed"])
    return tok.decode(prompt_ids + new)


def _chat_sample(folder: Path, prompt: str, tok, device: str, **kw) -> str:
    from lmpipe.chat_template import encode_chat, stop_ids
    from lmpipe.models import load_model
    from lmpipe.sampling import generate

    model, _ = load_model(folder, device=device)
    new = generate(model, encode_chat(tok, prompt).ids, stop_ids=stop_ids(tok), device=device, **kw)
    return tok.decode(new)


def run(params: Params) -> None:
    from lmpipe.tokenizer import Tokenizer, tokens_meta

    p = params.evaluate
    folders = model_folders(list(dict.fromkeys(p.models)))
    tok = Tokenizer.load()
    device = pick_device(p.device)
    with stage_logger(NAME, params.tracking.experiment) as log:
        log.log_params({NAME: p.model_dump(mode="json"), "device": device})
        results = score_models(p, folders, device, tok)
        stage_metrics = {m: read_json(paths.metrics_path(STAGE_OF[m])) for m in folders}
        for m in ("sft", "lora"):
            if m in results:
                results[m].update({k: stage_metrics[m][k] for k in TUNED_KEYS
                                   if isinstance(stage_metrics[m].get(k), (int, float))})
        write_metrics(NAME, results)
        log.log_metrics(flatten(results))

        curves = {}
        for m in folders:
            csv_path = paths.plots_dir(STAGE_OF[m]) / "loss.csv"
            if m != "ngram" and csv_path.exists():
                curves[m] = read_loss_csv(csv_path)
        scoring = ("Neural models: non-overlapping windows of the model's context length"
                   if p.stride is None else f"Neural models: sliding windows, stride {p.stride}")
        scoring += ("; the RNN carries its hidden state through the whole split."
                    if p.rnn_context is None else
                    f"; the RNN reads windows of {p.rnn_context} tokens from a zero state.")
        if p.max_tokens is not None:
            scoring += f" Only the first {p.max_tokens} tokens of the split are scored."
        data = ReportData(
            results=results,
            stage_metrics=stage_metrics,
            loss_curves=curves,
            samples=generate_samples(p, folders, device, tok, params.seed),
            environment=environment_info(device),
            source=read_json(paths.corpus_dir() / "source.json"),
            download_metrics=read_json(paths.metrics_path("download")),
            tokens_meta=tokens_meta(),
            split=SPLIT,
            scoring=scoring,
        )
        files = write_report(reports_dir(), data)
        for f in files.values():
            log.log_artifact(f, "report")
        log.log_artifact(paths.metrics_path(NAME), "metrics")
    print(f"evaluate: wrote {paths.metrics_path(NAME)} and {files['report']}")


if __name__ == "__main__":
    main_for(NAME, run)

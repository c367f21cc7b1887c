"""The report card: reports/report.md plus PNG plots, rendered offline with matplotlib (Agg).

`render_markdown(data)` is a pure function of a `ReportData` (what the evaluate stage gathered),
so the layout is tested without models; `write_report` adds the plots and publishes the folder
atomically.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from lmpipe.core.files import atomic_dir
from lmpipe.core.git import git_state
from lmpipe.core.names import CHAT_MODELS, MODEL_STAGE, SPLITS, TIMING_FIELD_SUFFIXES
from lmpipe.evaluation.metrics import family_order
from lmpipe.evaluation.plots import plot_bpb, plot_loss_curves

REPORT_FILE = "report.md"
LOSS_PNG = "loss_curves.png"
BPB_PNG = "bits_per_byte.png"
SPLIT_ORDER = {s: i for i, s in enumerate(SPLITS)}
LIBRARIES = ("torch", "numpy", "sentencepiece", "dvc", "mlflow", "prefect", "peft", "matplotlib")


@dataclass
class ReportData:
    results: dict[str, dict[str, Any]]                 # evaluate metrics per model
    stage_metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # per model
    loss_curves: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    samples: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)          # data/corpus/source.json
    download_metrics: dict[str, Any] = field(default_factory=dict)
    tokens_meta: dict[str, Any] = field(default_factory=dict)     # data/tokens/meta.json
    split: str = "test"
    scoring: str = ""                                  # how the neural models were scored
    descriptions: dict[str, str] = field(default_factory=dict)   # model_card.describe_model


# ----------------------------------------------------------------------------- gathering
def environment_info(device: str = "cpu") -> dict[str, str]:
    """Machine, device, library versions and git commit, for reproducing a run."""
    env = {
        "machine": f"{platform.system()} {platform.release()} {platform.machine()}, "
                   f"{os.cpu_count()} CPU cores",
        "python": platform.python_version(),
    }
    dev = str(device)
    if dev.startswith("cuda") and torch.cuda.is_available():
        dev = f"{dev} ({torch.cuda.get_device_name(torch.device(dev))})"
    env["threads"] = str(torch.get_num_threads())
    env["device"] = dev
    for lib in LIBRARIES:
        try:
            env[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            continue
    git = git_state()
    env["git commit"] = git["git_commit"] + (" (dirty)" if git["git_dirty"] == "true" else "")
    return env


# ----------------------------------------------------------------------------- markdown
def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:,.{digits}f}"
    return str(v)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        out.append("| " + " | ".join(_fmt(c).replace("|", "\\|") for c in row) + " |")
    return out


def _first(d: Mapping[str, Any], *keys: str) -> Any:
    for k in keys:
        if d.get(k) not in (None, ""):
            return d[k]
    return None


def _sha_entries(obj: Any, path: str = "") -> list[tuple[str, str]]:
    """(where, sha256) pairs found anywhere in source.json, named by a file name when there is one."""
    found = []
    if isinstance(obj, Mapping):
        name = _first(obj, "filename", "name", "path", "url")
        for k, v in obj.items():
            if k == "sha256" and isinstance(v, str):
                found.append((str(name or path or "input"), v))
            else:
                found.extend(_sha_entries(v, f"{path}.{k}" if path else str(k)))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found.extend(_sha_entries(v, f"{path}[{i}]"))
    return found


def render_markdown(data: ReportData) -> str:
    """The report card, section by section; a pure function of what `evaluate` gathered."""
    lines = ["# lmpipe report card", ""]
    best = _best(data)
    if best is not None:
        lines += [f"Best model on the {data.split} split: **{best}** at "
                  f"{_fmt(data.results[best].get(f'{data.split}_bpb'), 4)} bits per byte.", ""]
    lines += _order_lines(data)
    for section in (_what_section, _models_section, _tuned_section, _data_section, _tokenizer_section,
                    _environment_section, _samples_section):
        lines += section(data)
    return "\n".join(lines).rstrip() + "\n"


def _best(data: ReportData) -> str | None:
    return min(data.results, key=lambda m: data.results[m].get(f"{data.split}_bpb", math.inf),
               default=None)


def _order_lines(data: ReportData) -> list[str]:
    said = []
    for split in dict.fromkeys(("val", data.split)):
        o = family_order(data.results, split)
        if o is not None:
            said.append(f"{'holds' if o['holds'] else '**does not hold**'} on {split} "
                        f"(RNN {o['rnn_vs_ngram']:.3f}x, Transformer "
                        f"{o['transformer_vs_ngram']:.3f}x the n-gram's bits per byte)")
    if not said:
        return []
    return ["The course's order, Transformer < RNN < n-gram in bits per byte, "
            + "; ".join(said) + ".", ""]


def _what_section(data: ReportData) -> list[str]:
    if not data.descriptions:
        return []
    return (["## What these models are", ""] + [f"- {d}" for d in data.descriptions.values()]
            + [""])


def _models_section(data: ReportData) -> list[str]:
    split, best = data.split, _best(data)
    lines = ["## Models", "",
             f"Every model scores the same val and {split} tokens, in the same way. Perplexity "
             "is per token of this tokenizer; bits per byte (bpb) divides the total NLL by the "
             "UTF-8 bytes of the text, so it does not depend on the tokenizer. Each training "
             "stage published the weights of its lowest val loss (unless `select: last`); the "
             "RNN and the Transformer divide their logits by a temperature fitted on val after "
             "training (lmpipe/train/calibration.py; the finetuned models keep the pretrained "
             "one's).", ""]
    if data.scoring:
        lines += [data.scoring, ""]
    timed = [m for m, sm in data.stage_metrics.items() if sm.get("stopped_by") == "max_seconds"]
    if timed:
        lines += [f"**Warning**: {', '.join(timed)} stopped on train.max_seconds (wall clock): "
                  "these models depend on the machine's speed and are not reproducible.", ""]
    header = ["model", "stage", "parameters", "train time (s)", "tokens seen", "stopped by",
              "published step", "temperature", "val bpb", f"{split} ppl", f"{split} bpb", "vs best",
              f"{split} tokens", "scoring tok/s"]
    best_bpb = data.results[best].get(f"{split}_bpb") if best is not None else None
    rows = []
    for name, r in data.results.items():
        sm = data.stage_metrics.get(name, {})
        bpb = r.get(f"{split}_bpb")
        rel = (f"+{100 * (bpb / best_bpb - 1):.1f}%" if name != best else "best") \
            if bpb is not None and best_bpb else None
        rows.append([
            name, MODEL_STAGE.get(name, name), _first(r, "params") or _first(sm, "params"),
            _first(sm, "train_seconds"), _first(sm, "tokens_seen", "train_tokens"),
            _first(sm, "stopped_by"), _first(sm, "selected_step"), _first(sm, "temperature"),
            r.get("val_bpb"), r.get(f"{split}_ppl"), bpb, rel,
            r.get(f"{split}_tokens"), r.get("tokens_per_second"),
        ])
    return lines + _table(header, rows) + [
        "", f"![bits per byte per model]({BPB_PNG})", "",
        f"![loss curves of the neural models]({LOSS_PNG})", ""]


def _tuned_section(data: ReportData) -> list[str]:
    tuned = [m for m in CHAT_MODELS if m in data.results or m in data.stage_metrics]
    if not tuned:
        return []
    rows = []
    for m in tuned:
        r, sm = data.results.get(m, {}), data.stage_metrics.get(m, {})
        rows.append([
            m, _first(r, "trainable_params") or _first(sm, "trainable_params"),
            _first(r, "params") or _first(sm, "params"),
            _first(r, "val_response_ppl") or _first(sm, "val_response_ppl"),
            _first(r, "base_val_response_ppl") or _first(sm, "base_val_response_ppl"),
            r.get(f"{data.split}_ppl"), _first(sm, "train_seconds"),
        ])
    return ["## SFT versus LoRA", "",
            "Response perplexity is measured on the held-out instruction data, over the "
            "response tokens only; the base column is the pretrained Transformer on the "
            "same responses.", ""] + _table(
        ["model", "trainable params", "parameters", "val response ppl",
         "base val response ppl", f"{data.split} ppl (corpus)", "train time (s)"], rows) + [""]


def _source_lines(src: Mapping[str, Any]) -> list[str]:
    kind = src.get("source", "?")
    where = src.get("urls") or src.get("local") or (src.get("hf") or {}).get("path")
    if isinstance(where, list):
        where = ", ".join(where)
    lines = [f"- source: {kind}" + (f" ({where})" if where else "")]
    lines += [f"- {key}: {_fmt(src[key])}" for key in ("encoding", "bytes", "documents")
              if key in src]
    for item in src.get("inputs") or []:
        if isinstance(item, Mapping) and item.get("sha256"):
            lines.append(f"- input `{item.get('name', '?')}`: {_fmt(item.get('bytes'))} bytes, "
                         f"sha256 `{item['sha256']}`")
    if isinstance(src.get("sha256"), str):
        lines.append(f"- sha256 of all inputs: `{src['sha256']}`")
    if not src.get("inputs"):       # another layout: list every sha256 it holds
        for where_, sha in _sha_entries({k: v for k, v in src.items() if k != "sha256"}):
            lines.append(f"- sha256 of `{where_}`: `{sha}`")
    return lines + [""]


def _token_splits(data: ReportData) -> dict[str, dict]:
    splits = (data.tokens_meta or {}).get("splits", {})
    return {s: splits[s] for s in sorted(splits, key=lambda s: (SPLIT_ORDER.get(s, 9), s))}


def _data_section(data: ReportData) -> list[str]:
    src = data.source
    lines = ["## Data", ""] + (_source_lines(src) if src else [])
    splits = _token_splits(data)
    text_splits = src.get("splits") if isinstance(src.get("splits"), Mapping) else {}
    if splits:
        rows = []
        for s, v in splits.items():
            tokens, nbytes = v.get("tokens"), v.get("bytes")
            bpt = nbytes / tokens if tokens and nbytes is not None else None
            rows.append([s, v.get("documents"), (text_splits.get(s) or {}).get("lines"), nbytes,
                         tokens, bpt])
        lines += _table(["split", "documents", "lines", "bytes", "tokens", "bytes per token"],
                        rows) + [""]
    # the counts; not the timings and memory (metrics/download.json has them): the card is a
    # DVC out that two runs of the same params must write alike
    scalars = {k: v for k, v in data.download_metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)
               and not k.endswith(TIMING_FIELD_SUFFIXES)}
    if scalars:
        lines += ["Download stage metrics: " + ", ".join(
            f"{k} {_fmt(v)}" for k, v in sorted(scalars.items())), ""]
    return lines


def _tokenizer_section(data: ReportData) -> list[str]:
    meta = data.tokens_meta or {}
    if not meta:
        return []
    lines = ["## Tokenizer", "",
             f"- vocabulary: {_fmt(meta.get('vocab_size'))} pieces (sentencepiece BPE, "
             "byte fallback, exact round trip)"]
    lines += [f"- {s}: {v['bytes'] / v['tokens']:.3f} bytes per token"
              for s, v in _token_splits(data).items() if v.get("tokens")]
    if meta.get("tokenizer_sha256"):
        lines.append(f"- tokenizer.model sha256: `{meta['tokenizer_sha256']}`")
    return lines + [""]


def _environment_section(data: ReportData) -> list[str]:
    if not data.environment:
        return []
    return ["## Environment", ""] + [f"- {k}: {v}" for k, v in data.environment.items()] + [""]


def _samples_section(data: ReportData) -> list[str]:
    if not data.samples:
        return []
    lines = ["## Samples", ""]
    for name, samples in data.samples.items():
        lines += [f"### {name}", ""]
        for prompt, text in samples:
            lines += [f"Prompt: `{prompt!r}`", "", "```text", text.replace("```", "` ` `"),
                      "```", ""]
    return lines


def write_report(folder: str | os.PathLike, data: ReportData) -> dict[str, Path]:
    """Render report.md and the two PNGs into `folder` (replaced atomically as a whole)."""
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        plot_loss_curves(data.loss_curves, tmp / LOSS_PNG)
        plot_bpb({m: r[f"{data.split}_bpb"] for m, r in data.results.items()
                  if f"{data.split}_bpb" in r}, tmp / BPB_PNG, data.split)
        (tmp / REPORT_FILE).write_text(render_markdown(data), encoding="utf-8")
    return {"report": folder / REPORT_FILE, "loss": folder / LOSS_PNG, "bpb": folder / BPB_PNG}

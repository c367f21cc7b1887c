"""Instruction data for SFT and LoRA, normalised to `prompt` / `response` rows.

Self-Instruct: one row per instance; prompt = instruction, plus "\\n\\n" + input when the
input is not blank; response = output. GSM8K: prompt = question, response = answer.
The train/val split is by source record (a Self-Instruct task with several instances never
lands in both splits), drawn with a seeded permutation so it is reproducible.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lmpipe.core.errors import InputError
from lmpipe.data.reading import iter_jsonl
from lmpipe.data.text import normalize_newlines

Row = tuple[str, str]  # (prompt, response)


def _text(obj: dict, key: str, where: str, role: str) -> str:
    if key not in obj or obj[key] is None:
        raise InputError(f"{where}: no {key!r} field (the {role})")
    value = obj[key]
    if not isinstance(value, str):
        raise InputError(f"{where}: {key!r} is {type(value).__name__}, not text")
    if not value.strip():
        raise InputError(f"{where}: {key!r} is empty (the {role})")
    return normalize_newlines(value)


def self_instruct_rows(obj: dict, where: str) -> list[Row]:
    instruction = _text(obj, "instruction", where, "prompt").strip()
    instances = obj.get("instances")
    if not isinstance(instances, list) or not instances:
        raise InputError(f"{where}: no 'instances' list (each instance holds an input and output)")
    rows = []
    for j, inst in enumerate(instances):
        at = f"{where} (instance {j})"
        if not isinstance(inst, dict):
            raise InputError(f"{at}: expected an object with 'input' and 'output'")
        response = _text(inst, "output", at, "response")
        extra = inst.get("input") or ""
        if not isinstance(extra, str):
            raise InputError(f"{at}: 'input' is {type(extra).__name__}, not text")
        extra = normalize_newlines(extra).strip()
        rows.append((instruction + ("\n\n" + extra if extra else ""), response))
    return rows


def gsm8k_rows(obj: dict, where: str) -> list[Row]:
    return [(_text(obj, "question", where, "prompt"), _text(obj, "answer", where, "response"))]


FORMATS = {"self_instruct": self_instruct_rows, "gsm8k": gsm8k_rows}


def read_records(path: Path, label: str, fmt: str) -> list[list[Row]]:
    """One list of rows per source line of a .jsonl file."""
    if fmt not in FORMATS:
        raise InputError(f"download.instruct.format: unknown format {fmt!r}")
    if not label.lower().endswith(".jsonl") and path.suffix.lower() != ".jsonl":
        raise InputError(f"{label}: instruction data must be a .jsonl file")
    to_rows = FORMATS[fmt]
    return [to_rows(obj, f"{label}:{lineno}") for lineno, obj in iter_jsonl(path, label, "utf-8")]


def split_records(
    records: list[list[Row]], val_fraction: float, seed: int, max_rows: int | None = None
) -> tuple[list[Row], list[Row]]:
    """(train rows, val rows), split by record with a permutation seeded by `seed`."""
    if max_rows is not None:
        kept, left = [], max_rows
        for rec in records:
            if left <= 0:
                break
            kept.append(rec[:left])
            left -= len(kept[-1])
        records = kept
    records = [r for r in records if r]
    n = len(records)
    if n < 2:
        raise InputError(
            f"instruction data has {n} record(s); a train/val split needs at least 2"
        )
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    val_ids = set(perm[:n_val].tolist())
    train = [row for i, rec in enumerate(records) if i not in val_ids for row in rec]
    val = [row for i, rec in enumerate(records) if i in val_ids for row in rec]
    return train, val

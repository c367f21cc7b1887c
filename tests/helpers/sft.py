"""A scratch project for the `sft`, `lora` and `chat` tests: tokenizer, base model, instruct data.

Everything is tiny and hand-made: a tokenizer trained on a few hundred lines, a 2-layer
Transformer saved with `save_model`, and a synthetic instruction task (copy a few words, in
upper case) that a tiny model picks up in a few dozen steps.
"""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

WORDS = ("apple", "river", "stone", "cloud", "green", "light", "north", "table", "music",
         "bread", "glass", "tiger", "ocean", "paper", "smile", "night")
TINY_MODEL = dict(context_length=96, n_layer=2, n_head=2, d_model=48, dropout=0.0)


def task_rows(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.sample(WORDS, rng.randint(2, 4))
        rows.append((f"Shout: {' '.join(words)}", " ".join(w.upper() for w in words) + "!"))
    return rows


def write_instruct(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"prompt": [p for p, _ in rows], "response": [r for _, r in rows]})
    pq.write_table(table, path)
    return path


def make_tokenizer(root: Path):
    from lmpipe.tokenizer.model import save_tokenizer
    from lmpipe.tokenizer.training import train_tokenizer

    lines = [f"{p}\n{r}\nYou are a helpful assistant. system user assistant"
             for p, r in task_rows(200, seed=99)]
    tok = train_tokenizer(lines, vocab_size=340)
    save_tokenizer(tok, root / "data" / "tokenizer" / "tokenizer.model")
    return tok


def make_project(root: Path, n_train: int = 96, n_val: int = 16, seed: int = 0):
    """Tokenizer, base model (data/models/transformer) and instruct splits under `root`."""
    from lmpipe.models.store import build_model, save_model

    tok = make_tokenizer(root)
    write_instruct(root / "data" / "instruct" / "train.parquet", task_rows(n_train, seed=1))
    write_instruct(root / "data" / "instruct" / "val.parquet", task_rows(n_val, seed=2))
    cfg = dict(vocab_size=tok.vocab_size, **TINY_MODEL)
    torch.manual_seed(seed)
    model = build_model("transformer", cfg)
    save_model(model, root / "data" / "models" / "transformer", "transformer", cfg)
    return tok

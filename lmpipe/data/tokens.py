"""Token files: what every model trains on and is scored on.

``data/tokens/{train,val,test}.bin`` are flat little-endian arrays (uint16 when the vocabulary
fits, else uint32) holding each document's ids followed by EOS; ``data/tokens/meta.json``
records the dtype, the special ids and, per split, the token, UTF-8 byte and document counts
(bits per byte = total NLL in bits / bytes). ``load_tokens(split)`` memory-maps one split, so
opening a split costs nothing whatever its size.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from lmpipe.core.errors import InputError
from lmpipe.core.names import TOKENS_META_FILE
from lmpipe.core.paths import tokens_dir
from lmpipe.data.corpus import iter_text_batches


def token_dtype(vocab_size: int) -> np.dtype:
    """Little-endian uint16 when every id fits in 16 bits, else uint32."""
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


def _tokens_root(root: str | os.PathLike | None) -> Path:
    if root is None:
        return tokens_dir()
    root = Path(root)
    if not (root / TOKENS_META_FILE).exists() and (root / "data" / "tokens" / TOKENS_META_FILE).exists():
        return root / "data" / "tokens"  # a project root was given
    return root


def tokens_meta(root: str | os.PathLike | None = None) -> dict:
    """data/tokens/meta.json (`root`: the tokens folder, or a project root)."""
    path = _tokens_root(root) / TOKENS_META_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: token files not found; run `dvc repro tokenizer`") from None


def load_tokens(split: str, root: str | os.PathLike | None = None) -> np.ndarray:
    """Memory-map the token ids of one split (read-only; dtype from meta.json)."""
    folder = _tokens_root(root)
    meta = tokens_meta(folder)
    if split not in meta["splits"]:
        raise InputError(f"unknown split {split!r}; token files have: {', '.join(meta['splits'])}")
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    path = folder / f"{split}.bin"
    expected = meta["splits"][split]["tokens"]
    size = path.stat().st_size
    if size != expected * dtype.itemsize:
        raise InputError(
            f"{path}: {size} bytes, but meta.json says {expected} {meta['dtype']} tokens; "
            "rerun `dvc repro tokenizer`"
        )
    if size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def encode_split(tok, corpus_file: str | os.PathLike, out_file: str | os.PathLike,
                 num_threads: int | None = None, batch_docs: int = 4096) -> dict[str, int]:
    """Encode one corpus split to a flat .bin (documents each followed by EOS), a batch of
    documents at a time. Returns ``{"tokens": N, "bytes": B, "documents": D}`` with B the
    UTF-8 bytes of the text."""
    n_tokens = n_bytes = n_docs = 0
    with open(out_file, "wb") as f:
        for docs in iter_text_batches(corpus_file, batch_docs):
            arr = tok.encode_documents(docs, num_threads=num_threads)
            arr.tofile(f)
            n_tokens += int(arr.size)
            n_docs += len(docs)
            n_bytes += sum(len(d.encode("utf-8")) for d in docs)
    return {"tokens": n_tokens, "bytes": n_bytes, "documents": n_docs}


def write_tokens_meta(folder: str | os.PathLike, tok, splits: dict[str, dict[str, int]],
                      tokenizer_sha256: str) -> dict[str, Any]:
    """meta.json beside the .bin files: dtype, vocabulary, special ids, per-split counts."""
    meta = {
        "dtype": token_dtype(tok.vocab_size).name,
        "byteorder": "little",
        "vocab_size": tok.vocab_size,
        **tok.special_ids(),
        "tokenizer_sha256": tokenizer_sha256,
        "splits": splits,
    }
    (Path(folder) / TOKENS_META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n",
                                                 encoding="utf-8")
    return meta

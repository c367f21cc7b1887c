"""Token files: what every model trains on and is scored on.

``data/tokens/<split>/part-NNNNN.bin`` are flat little-endian arrays (uint16 when the
vocabulary fits, else uint32), one per corpus shard (data/corpus/<split>/part-NNNNN.parquet),
holding each document's ids followed by EOS; a split is its shards in order, the way
nanoGPT's and modded-nanoGPT's FineWeb shards are. ``data/tokens/meta.json`` records the
dtype, the special ids and, per split, the token, UTF-8 byte and document counts (bits per
byte = total NLL in bits / bytes) and each shard's file and counts. A split written as one
file ``<split>.bin`` with no shard list is read too.

``load_tokens(split)`` memory-maps every shard of a split: opening it costs the same for
1 MB or 1 TB of tokens, and only what is read is paged in. One shard comes back as an
``np.memmap``; several as a ``ShardedTokens`` view that reads like one flat array.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from lmpipe.core.errors import InputError
from lmpipe.core.names import TOKENS_META_FILE, TOKENS_SUFFIX, shard_file
from lmpipe.core.paths import tokens_dir


def token_dtype(vocab_size: int) -> np.dtype:
    """Little-endian uint16 when every id fits in 16 bits, else uint32."""
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


class ShardedTokens:
    """Memory-mapped shards read as one flat, read-only token array.

    Supports what readers of a token stream use: ``len``, ``shape``, ``dtype``, ``size``,
    integer indexing and contiguous slices (``x[a:b]``, which copies only that range, also
    across a shard boundary), and ``np.asarray(x)`` (a copy of the whole split: for the
    small splits only).
    """

    ndim = 1

    def __init__(self, shards: list[np.ndarray]):
        self.shards = [s for s in shards if s.size]
        self.dtype = shards[0].dtype if shards else np.dtype("<u2")
        self.starts = np.cumsum([0] + [s.size for s in self.shards]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def size(self) -> int:
        return len(self)

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def _locate(self, i: int) -> tuple[int, int]:
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return k, i - int(self.starts[k])

    def __getitem__(self, key):
        n = len(self)
        if isinstance(key, slice):
            a, b, step = key.indices(n)
            if step != 1:
                return np.asarray(self[a:b])[::step]
            if b <= a:
                return np.empty(0, dtype=self.dtype)
            k, off = self._locate(a)
            parts, need = [], b - a
            while need > 0:
                take = np.asarray(self.shards[k][off:off + need])
                parts.append(take)
                need -= take.size
                k, off = k + 1, 0
            return parts[0].copy() if len(parts) == 1 else np.concatenate(parts)
        i = int(key)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"token index {key} out of range for a split of {n} tokens")
        k, off = self._locate(i)
        return self.shards[k][off]

    def __array__(self, dtype=None, copy=None):
        out = self[0:len(self)]
        return out if dtype is None else out.astype(dtype)

    def tolist(self) -> list[int]:
        return np.asarray(self).tolist()


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


def split_files(split: str, root: str | os.PathLike | None = None) -> list[tuple[Path, int]]:
    """(file, tokens) of each shard of a split, in order, as meta.json lists them."""
    folder = _tokens_root(root)
    meta = tokens_meta(folder)
    if split not in meta["splits"]:
        raise InputError(f"unknown split {split!r}; token files have: {', '.join(meta['splits'])}")
    info = meta["splits"][split]
    if "shards" not in info:  # one file per split
        return [(folder / f"{split}{TOKENS_SUFFIX}", int(info["tokens"]))]
    return [(folder / s["file"], int(s["tokens"])) for s in info["shards"]]


def load_tokens(split: str, root: str | os.PathLike | None = None):
    """Memory-map the token ids of one split (read-only; dtype from meta.json): an
    np.memmap for a split of one file, a ShardedTokens view over several."""
    folder = _tokens_root(root)
    dtype = np.dtype(tokens_meta(folder)["dtype"]).newbyteorder("<")
    arrays = []
    for path, expected in split_files(split, folder):
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise InputError(f"{path}: token file missing; rerun `dvc repro tokenizer`") from None
        if size != expected * dtype.itemsize:
            raise InputError(f"{path}: {size} bytes, but meta.json says {expected} {dtype.name} "
                             "tokens; rerun `dvc repro tokenizer`")
        arrays.append(np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype=dtype))
    if len(arrays) == 1:
        return arrays[0]
    return ShardedTokens(arrays)


def shard_path(split: str, index: int) -> str:
    """A token shard's path relative to the tokens folder: train/part-00000.bin."""
    return f"{split}/{shard_file(index, TOKENS_SUFFIX)}"


def write_tokens_meta(folder: str | os.PathLike, tok, splits: dict[str, list[dict[str, Any]]],
                      tokenizer_sha256: str) -> dict[str, Any]:
    """meta.json beside the token shards: dtype, vocabulary, special ids, per split the
    totals and the shards (`splits`: per split, each shard's {file, tokens, bytes, documents})."""
    per_split = {}
    for name, shards in splits.items():
        per_split[name] = {k: sum(int(s[k]) for s in shards) for k in ("tokens", "bytes", "documents")}
        per_split[name]["shards"] = [dict(s) for s in shards]
    meta = {
        "dtype": token_dtype(tok.vocab_size).name,
        "byteorder": "little",
        "vocab_size": tok.vocab_size,
        **tok.special_ids(),
        "tokenizer_sha256": tokenizer_sha256,
        "splits": per_split,
    }
    (Path(folder) / TOKENS_META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n",
                                                 encoding="utf-8")
    return meta

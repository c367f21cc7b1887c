"""Shared by the trainer, checkpoint and DDP tests: hand-made token files and tiny projects."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable


def markov_tokens(n: int, vocab: int, seed: int = 0, eos_id: int = 2, doc_len: int = 400) -> np.ndarray:
    """A learnable stream: each token mostly follows from the previous one; EOS every doc."""
    nxt = np.random.default_rng(12345).integers(4, vocab, size=(vocab, 3))  # one "language"
    rng = np.random.default_rng(seed)                                        # many texts
    out = np.empty(n, dtype=np.int64)
    t = 4
    for i in range(n):
        if i % doc_len == doc_len - 1:
            out[i] = eos_id
            t = 4
            continue
        t = int(nxt[t, rng.integers(0, 3)]) if rng.random() < 0.9 else int(rng.integers(4, vocab))
        out[i] = t
    return out


def write_tokens(root: Path, train: np.ndarray, val: np.ndarray, vocab: int, eos_id: int = 2,
                 bytes_per_token: float = 2.5) -> Path:
    """data/tokens/{train,val}.bin + meta.json, in the tokenizer stage's layout."""
    folder = Path(root) / "data" / "tokens"
    folder.mkdir(parents=True, exist_ok=True)
    splits = {}
    for name, ids in (("train", train), ("val", val)):
        arr = np.asarray(ids, dtype=np.uint16)
        arr.tofile(folder / f"{name}.bin")
        splits[name] = {"tokens": int(arr.size), "bytes": int(round(arr.size * bytes_per_token))}
    meta = {"dtype": "uint16", "vocab_size": int(vocab), "eos_id": eos_id, "bos_id": 1,
            "pad_id": 0, "splits": splits}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))
    return folder


def write_params(root: Path, overlay: dict[str, Any], profile: str = "smoke") -> Path:
    """params.yaml = the profile's params with `overlay` merged in (not validated here)."""
    from lmpipe.core.profiles import deep_merge, dump_params, profile_dict

    params = deep_merge(profile_dict(profile), overlay)
    path = Path(root) / "params.yaml"
    path.write_text(dump_params(params))
    return path


def make_project(root: Path, overlay: dict[str, Any] | None = None, vocab: int = 64,
                 n_train: int = 6000, n_val: int = 1500) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    write_tokens(root, markov_tokens(n_train, vocab, seed=1), markov_tokens(n_val, vocab, seed=2),
                 vocab)
    write_params(root, overlay or {})
    return root


def stage_env(root: Path, tracking: bool = False, threads: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["LMPIPE_ROOT"] = str(root)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("LMPIPE_PARAMS", None)
    if not tracking:
        env["LMPIPE_TRACKING"] = "off"
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def run_stage(name: str, root: Path, timeout: float = 600, **env_kw) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", f"stages.{name}"], cwd=root, env=stage_env(root, **env_kw),
                          capture_output=True, text=True, timeout=timeout)


def tiny_train(**overrides):
    """A TrainParams for in-process tests: CPU, fp32 unless asked, 1 thread, no bar."""
    from lmpipe.core.params import TrainParams

    base = dict(device="cpu", precision="fp32", threads=1, progress=False, lr=1e-2, min_lr=1e-3,
                warmup_steps=2, batch_size=4, max_steps=10, max_tokens=None, max_seconds=None,
                eval_every=5, eval_batches=1, log_every=1, checkpoint_every=5, keep_checkpoints=2)
    base.update(overrides)
    return TrainParams(**base)


def safetensors_parts(path: Path) -> tuple[dict, bytes]:
    """(parsed header, raw tensor bytes) of a safetensors file.

    Comparing these, not the whole file: safetensors writes a `__metadata__` map of two or more
    entries in a random order (a Rust HashMap), so equal weights can give different file bytes.
    """
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]

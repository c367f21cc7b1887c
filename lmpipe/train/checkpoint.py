"""Resumable training checkpoints: one folder per saved step, written atomically.

    data/checkpoints/<stage>/step-00000400/
        model.safetensors    weights (safetensors; tied tensors stored once)
        optimizer.pt         optimizer state dicts (torch.save; read back weights_only=True)
        rng.pt               every generator's state: python, numpy, torch, cuda, per rank
        state.json           step, tokens, elapsed seconds, loader position, loss history, the
                             best val loss so far and the run's *fingerprint* (model config +
                             the params that shape the trajectory + a digest of the data)
        best.safetensors     the weights of the lowest val loss so far (`select: best`), so a
                             resumed run still publishes the best step's weights

A folder is complete or absent: it is built under a temporary name and renamed into place
(`lmpipe.core.files.atomic_dir`), so a kill at any moment leaves the previous checkpoints intact.
Only the newest `keep` folders are kept.

Resuming only makes sense for the same run: `find_resumable` compares fingerprints and
returns the newest checkpoint of *this* run; a checkpoint of another run (other params,
another model shape, other data) is never loaded: the trainer says which keys differ, moves
the old checkpoints aside (``stale/``, one generation kept) and starts fresh.
`load_checkpoint` itself refuses weights that do not fit the model with a clear error.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import safetensors.torch
import torch

from lmpipe.core.errors import InputError
from lmpipe.core.files import atomic_dir, write_json_atomic
from lmpipe.core.names import TOKENS_META_FILE, WEIGHTS_FILE

STEP_DIR = re.compile(r"^step-(\d{8,})$")
WEIGHTS = WEIGHTS_FILE
OPTIMIZER = "optimizer.pt"
RNG = "rng.pt"
STATE = "state.json"
BEST = "best.safetensors"


class CheckpointError(InputError):
    """A checkpoint that cannot be used for this model or run (exit 2: a retry reads the same
    bytes; the message names the file and how to move past it)."""


# ----------------------------------------------------------------------------- RNG states
def capture_rng() -> dict[str, Any]:
    """The state of every global generator, as tensors/lists that weights_only can load."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [int(version), [int(k) for k in mt], gauss],
        "numpy": [str(name), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos),
                  int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((int(version), tuple(int(k) for k in mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss),
                         float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            torch.cuda.set_rng_state(cuda_states[0])


# ----------------------------------------------------------------------------- identity
# Train params that do not change the trajectory: changing them keeps the checkpoints usable.
# (max_seconds only stops a run; select only picks which kept weights are published.)
OPERATIONAL_KEYS = frozenset({"progress", "log_every", "eval_every", "eval_batches",
                              "checkpoint_every", "keep_checkpoints", "threads", "compile",
                              "device", "max_seconds", "select"})


def data_digest(tokens_dir: Path, split: str = "train") -> dict[str, Any]:
    """A cheap identity of the training data: meta.json's hash, the file's size and the
    hash of its first and last MiB (hashing a large corpus in full would cost minutes)."""
    h = hashlib.sha256()
    meta = tokens_dir / TOKENS_META_FILE
    data = tokens_dir / f"{split}.bin"
    h.update(meta.read_bytes())
    size = data.stat().st_size
    with open(data, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(size - (1 << 20))
            h.update(f.read(1 << 20))
    return {"split": split, "bytes": size, "sha256": h.hexdigest()}


def run_fingerprint(model_type: str, model_config: dict[str, Any], train_cfg: Any,
                    context_length: int, seed: int, world_size: int,
                    data: dict[str, Any]) -> dict[str, Any]:
    """What identifies one training run: the model, the params that shape its trajectory, the
    seed, the world size and the data. A checkpoint resumes only a run with the same one."""
    train = {k: v for k, v in train_cfg.model_dump(mode="json").items()
             if k not in OPERATIONAL_KEYS}
    return {"model_type": model_type, "model": model_config, "train": train,
            "context_length": int(context_length), "seed": int(seed),
            "world_size": int(world_size), "data": data}


# ----------------------------------------------------------------------------- listing
def checkpoint_dirs(folder: str | Path) -> list[Path]:
    """Complete checkpoint folders under `folder`, oldest first (temporary ones are hidden)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / STATE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: str | Path) -> Path | None:
    dirs = checkpoint_dirs(folder)
    return dirs[-1] if dirs else None


def read_state(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / STATE).read_text(encoding="utf-8"))


def fingerprint_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two fingerprints (nested dicts)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += fingerprint_diff(old.get(key, "<absent>"), new.get(key, "<absent>"),
                                    f"{prefix}{key}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


@dataclass
class Resumable:
    path: Path | None          # the checkpoint to resume from, if any
    stale: list[Path]          # checkpoints of another run (never loaded)
    reason: str = ""           # why the stale ones do not match


def find_resumable(folder: str | Path, fingerprint: dict[str, Any]) -> Resumable:
    """The newest checkpoint written by a run with this exact fingerprint."""
    dirs = checkpoint_dirs(folder)
    if not dirs:
        return Resumable(None, [])
    fp = json.loads(json.dumps(fingerprint))   # the JSON round trip the saved one went through
    matching, stale, reason = [], [], ""
    for d in dirs:
        try:
            saved = read_state(d).get("fingerprint")
        except (OSError, ValueError) as err:
            stale.append(d)
            reason = reason or f"{d.name}: unreadable state.json ({err})"
            continue
        if saved == fp:
            matching.append(d)
        else:
            stale.append(d)
            if not reason:
                keys = fingerprint_diff(saved, fp)
                shown = ", ".join(keys[:8]) + (", ..." if len(keys) > 8 else "")
                reason = f"{d.name} was written with different {shown}"
    return Resumable(matching[-1] if matching else None, stale, reason)


def clean_leftovers(folder: str | Path) -> int:
    """Remove the temporary folders a killed save left behind (`.step-*.tmp`, `.step-*.old-*`)."""
    folder = Path(folder)
    n = 0
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(".step-") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                n += 1
    return n


def set_aside(paths: Sequence[Path]) -> Path | None:
    """Move checkpoints of another run into `<folder>/stale/` (replacing the previous ones)."""
    if not paths:
        return None
    stale = paths[0].parent / "stale"
    if stale.exists():
        shutil.rmtree(stale)
    stale.mkdir(parents=True)
    for p in paths:
        p.rename(stale / p.name)
    return stale


# ----------------------------------------------------------------------------- save / load
def save_checkpoint(folder: str | Path, step: int, model: torch.nn.Module,
                    optimizers: Sequence[torch.optim.Optimizer], state: dict[str, Any],
                    rng: Any, keep: int = 2,
                    best: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `folder/step-XXXXXXXX/` atomically, then prune all but the newest `keep`.

    `rng` is whatever `capture_rng` returned (a list of them under DDP, one per rank); `best`,
    a state dict of the best-val weights so far, goes to best.safetensors.
    """
    target = Path(folder) / f"step-{step:08d}"
    with atomic_dir(target) as tmp:
        safetensors.torch.save_model(model, str(tmp / WEIGHTS))
        if best is not None:   # a copy per name (tied weights included): nothing shared
            safetensors.torch.save_file(best, str(tmp / BEST))
        torch.save([opt.state_dict() for opt in optimizers], tmp / OPTIMIZER)
        torch.save(rng, tmp / RNG)
        write_json_atomic(tmp / STATE, {**state, "step": int(step)})
    for old in checkpoint_dirs(folder)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(path: str | Path, model: torch.nn.Module,
                    optimizers: Sequence[torch.optim.Optimizer] = ()) -> tuple[dict[str, Any], Any]:
    """Load weights (strict) and optimizer states; return (state.json, rng states).

    Raises CheckpointError naming the file when the checkpoint does not fit this model.
    """
    path = Path(path)
    try:
        state = read_state(path)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path / STATE}: unreadable checkpoint state: {err}") from None
    try:
        safetensors.torch.load_model(model, str(path / WEIGHTS), strict=True)
    except Exception as err:  # shape or name mismatch, corrupt file
        raise CheckpointError(f"{path / WEIGHTS}: does not fit this model "
                              f"(corrupt, or different params or shape?): {err}; delete {path} "
                              "to resume from the previous checkpoint") from None
    loaded = {}
    for name in (OPTIMIZER, RNG):
        try:
            loaded[name] = torch.load(path / name, map_location="cpu", weights_only=True)
        except Exception as err:   # corrupt, truncated, or a pickle that is not plain tensors
            lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()] or [type(err).__name__]
            first = next((ln for ln in lines if "Unsupported global" in ln), lines[0])[:300]
            raise CheckpointError(
                f"{path / name}: refused or unreadable (loaded with weights_only=True, nothing "
                f"is unpickled beyond tensors): {first}; delete {path} to resume from the "
                "previous checkpoint") from None
    opt_states, rng = loaded[OPTIMIZER], loaded[RNG]
    if len(opt_states) != len(optimizers):
        raise CheckpointError(f"{path / OPTIMIZER}: holds {len(opt_states)} optimizer states, "
                              f"this run has {len(optimizers)} optimizers")
    for opt, saved in zip(optimizers, opt_states):
        try:
            opt.load_state_dict(saved)
        except (ValueError, KeyError, RuntimeError) as err:
            raise CheckpointError(f"{path / OPTIMIZER}: does not fit this optimizer: {err}") from None
    return state, rng


def load_best(path: str | Path) -> dict[str, torch.Tensor] | None:
    """The best-val weights saved with a checkpoint (None when it holds none)."""
    file = Path(path) / BEST
    if not file.is_file():
        return None
    try:
        return safetensors.torch.load_file(str(file))
    except Exception as err:
        raise CheckpointError(f"{file}: unreadable best-val weights: {err}; delete {path} to "
                              "resume from the previous checkpoint") from None

"""Where a training step's time goes: a torch.profiler breakdown by part of the model.

    from breakdown import step_breakdown
    rows = step_breakdown(trainer, steps=2)   # [(part, ms per step, share of the step)]

How the time is attributed (nothing in the library is changed for it):
  * forward: labelled ranges (`torch.profiler.record_function`) are opened around the model's
    parts for the duration of the profile only: module hooks on RMSNorm (norms), the attention
    and MLP modules and their Linear layers, the embedding and the head; the module-level
    functions `apply_rotary` and `lm_loss` and Muon's Newton-Schulz are wrapped the same way,
    as are the trainer's batch loader and gradient clipping. Each profiled op goes to the
    innermost label that encloses it.
  * backward: the autograd engine runs each node as an event `evaluate_function: XBackward0`
    whose `sequence_nr` is that of the forward op that created it, so every backward op goes
    to the part its forward op belongs to (attention's backward counts as attention).
  * the optimizers: torch labels `Optimizer.step#Muon.step` and `#AdamW.step` itself.
Times are self CPU times (on a GPU: kernel times) summed per part, divided by the number of profiled steps, so the
parts add up to the step (the profiler adds a little overhead per op).
"""

from __future__ import annotations

import contextlib
import functools
from collections import defaultdict
from typing import Any, Callable, Iterator

import torch
import torch.optim._muon as muon_impl
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

import lmpipe.models.transformer as transformer_mod

PARTS = [
    "attention (scores, softmax, weighted sum)", "attention projections (qkv, out)",
    "rotary", "norms", "MLP matmuls (fc, proj)", "SwiGLU (silu * up)",
    "embedding + head", "loss (log-softmax, nll)", "residual adds, casts, reshapes",
    "Muon Newton-Schulz", "Muon momentum + update", "AdamW", "grad clip + zero_grad",
    "data loading", "other",
]
_PREFIX = "bd::"


def _labelled(fn: Callable, label: str) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with record_function(_PREFIX + label):
            return fn(*args, **kwargs)
    return wrapper


def _module_label(name: str, module: nn.Module) -> str | None:
    leaf = name.rsplit(".", 1)[-1]
    kind = type(module).__name__
    if kind == "RMSNorm":
        return "norms"
    if kind == "CausalSelfAttention":
        return "attention (scores, softmax, weighted sum)"
    if kind == "MLP":
        return "SwiGLU (silu * up)"
    if isinstance(module, nn.Linear) and ".attn." in f".{name}":
        return "attention projections (qkv, out)"
    if isinstance(module, nn.Linear) and ".mlp." in f".{name}":
        return "MLP matmuls (fc, proj)"
    if leaf in ("head", "embed"):
        return "embedding + head"
    if name == "":
        return "residual adds, casts, reshapes"
    return None


@contextlib.contextmanager
def _labels(trainer: Any) -> Iterator[None]:
    """Install the labels for the duration of the profile; everything is restored after."""
    handles, restore = [], []
    for name, module in trainer.model.named_modules():
        label = _module_label(name, module)
        if label is None:
            continue
        state: dict[str, Any] = {}

        def pre(mod, args, label=label, state=state):
            state.setdefault("stack", []).append(record_function(_PREFIX + label).__enter__())

        def post(mod, args, out, state=state):
            state["stack"].pop().__exit__(None, None, None)

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))

    def patch(owner: Any, attr: str, label: str) -> None:
        original = getattr(owner, attr)
        setattr(owner, attr, _labelled(original, label))
        restore.append((owner, attr, original))

    patch(transformer_mod, "apply_rotary", "rotary")
    patch(transformer_mod, "lm_loss", "loss (log-softmax, nll)")
    patch(muon_impl, "_zeropower_via_newtonschulz", "Muon Newton-Schulz")
    patch(torch.nn.utils, "clip_grad_norm_", "grad clip + zero_grad")
    patch(trainer.batches, "next", "data loading")
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for owner, attr, original in reversed(restore):
            if owner is trainer.batches:
                delattr(owner, attr)      # back to the class's method
            else:
                setattr(owner, attr, original)


def _own_label(evt) -> str | None:
    """The innermost breakdown label or optimizer range enclosing `evt` (itself included)."""
    while evt is not None:
        name = evt.name
        if name.startswith(_PREFIX):
            return name[len(_PREFIX):]
        if name.startswith("Optimizer.step#Muon"):
            return "Muon momentum + update"
        if name.startswith("Optimizer.step#"):
            return "AdamW"
        if name.startswith("Optimizer.zero_grad"):
            return "grad clip + zero_grad"
        evt = evt.cpu_parent
    return None


def _backward_root(evt):
    while evt is not None:
        if evt.name.startswith("autograd::engine::evaluate_function"):
            return evt
        evt = evt.cpu_parent
    return None


def labelled_events(events) -> Iterator[tuple[Any, str]]:
    """Each profiled event with the part it belongs to ('other' when none encloses it)."""
    by_seq: dict[int, str] = {}
    for e in events:                        # forward ops that created an autograd node
        if e.sequence_nr >= 0 and not e.name.startswith("autograd::"):
            label = _own_label(e)
            if label is not None:
                by_seq.setdefault(e.sequence_nr, label)
    for e in events:
        label = _own_label(e)
        if label is None:
            root = _backward_root(e)
            if root is not None:
                label = by_seq.get(root.sequence_nr)
                if label is None and "AccumulateGrad" in root.name:
                    label = "residual adds, casts, reshapes"
        yield e, label or "other"


def attribute(events, on_gpu: bool = False) -> dict[str, float]:
    """Self microseconds per part over every event of a profile: CPU time, or on a GPU the
    device time of the kernels each op launched."""
    totals: dict[str, float] = defaultdict(float)
    for e, label in labelled_events(events):
        totals[label] += e.self_device_time_total if on_gpu else e.self_cpu_time_total
    return totals


def step_breakdown(trainer: Any, steps: int = 2) -> list[tuple[str, float, float]]:
    """Profile `steps` training steps; returns (part, ms per step, share) rows, largest first."""
    on_gpu = trainer.rt.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with _labels(trainer), profile(activities=activities) as prof:
        for _ in range(steps):
            trainer.train_step()
        if on_gpu:
            torch.cuda.synchronize()
    totals = attribute(prof.events(), on_gpu)
    whole = sum(totals.values()) or 1.0
    rows = [(part, totals.get(part, 0.0) / steps / 1e3, totals.get(part, 0.0) / whole)
            for part in PARTS if totals.get(part, 0.0) > 0]
    return sorted(rows, key=lambda r: -r[1])

"""The shared trainer: one loop for every neural stage (rnn, pretrain, sft, lora).

What one optimizer step does
----------------------------
    lr_t  = schedule(step)                 linear warmup, then cosine decay to min_lr
    for each of grad_accum micro-batches:  loss_i = model(x_i, y_i) under bf16 autocast
        (loss_i / grad_accum).backward()   grads add up to the big-batch gradient
    stop if the mean loss is not finite    (names the step; the last good checkpoint stays)
    clip the global grad norm to grad_clip
    AdamW step (and Muon for the hidden matrices when optimizer: muon)

Parameter groups and the schedule: lmpipe/train/optim.py.

Nothing that shapes the weights reads the clock
-----------------------------------------------
The schedule (warmup, then cosine decay to ``min_lr`` at the last step), the evaluations
(every ``eval_every`` steps and at the last) and the checkpoints (every ``checkpoint_every``
steps) are functions of the step. The budget is ``max_steps`` and/or ``max_tokens`` (global
tokens, all ranks and micro-batches), whichever is smaller: the same params give the same
model on any machine, under any load. ``max_seconds`` is a guard a user may add (resumes
carry the elapsed time over): it stops the run without touching the schedule, and the result
records ``stopped_by: max_seconds`` with a warning, because such a run is not reproducible.

Model selection on validation (``select: best``, nanoGPT's practice of keeping the weights
of the best val loss): every evaluation measures the val loss on fixed windows
(``eval_batches``; null = every window of the val split); the weights of the lowest one are
kept (in memory, and as ``best.safetensors`` in each checkpoint, so a resumed run keeps
them) and are what the model holds when ``fit`` returns. ``select: last`` keeps the last
step's. Either way the result names the best step and its val loss.

Checkpoints (lmpipe/train/checkpoint.py) every ``checkpoint_every`` steps and at the end; re-running
resumes from the newest one of the same run. On CPU with the same params, a killed-then-
resumed run ends with byte-identical weights to an uninterrupted one: the batch order is a
pure function of (seed, epoch, index), every RNG state is restored, and CPU kernels are
deterministic for a fixed thread count (keep ``threads`` the same across the two runs).

Data parallelism: under ``torchrun`` (WORLD_SIZE > 1) the model is wrapped in
DistributedDataParallel (gloo on CPU, nccl on CUDA); every rank reads its slice of the same
global batch; rank 0 alone writes checkpoints (the logger knows its rank).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lmpipe.core.console import note, progress
from lmpipe.core.errors import InputError
from lmpipe.core.metric_logger import MetricLogger, NullLogger
from lmpipe.core.names import IGNORE_INDEX
from lmpipe.train import checkpoint as ckpt
from lmpipe.train.calibration import TemperatureFit
from lmpipe.train.optim import build_optimizers, lr_at
from lmpipe.train.runtime import Runtime, setup_runtime

Batch = tuple[torch.Tensor, torch.Tensor]


class NonFiniteLossError(InputError):
    """The loss (or gradient) became NaN/inf. Exit 2: retrying the same deterministic run
    would meet it again; the usual cure is a lower lr or fp32."""


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_loss(model: nn.Module, batches: Sequence[Batch], rt: Runtime) -> float:
    """Token-weighted mean loss over fixed batches (split across ranks, summed over all)."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=rt.device)
    for x, y in list(batches)[rt.rank::rt.world_size]:
        x, y = x.to(rt.device), y.to(rt.device)
        with rt.autocast():
            logits = model(x)[0]
        total[0] += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1),
                                    ignore_index=IGNORE_INDEX, reduction="sum").double()
        total[1] += (y != IGNORE_INDEX).sum()
    if rt.distributed:
        dist.all_reduce(total)
    model.train(was_training)
    return float(total[0] / total[1].clamp(min=1))


# ----------------------------------------------------------------------------- the trainer
@dataclass
class TrainResult:
    step: int
    tokens_seen: int
    train_loss: float            # mean over the last `log_every` steps (or fewer)
    val_loss: float | None       # periodic val loss of the weights returned (see `select`)
    seconds: float               # wall time of the whole run, resumed parts included
    resumed_from: int | None
    history: list[dict[str, Any]]
    stopped_by: str = "max_steps"        # max_steps, max_tokens or max_seconds
    best_step: int | None = None         # the step of the lowest periodic val loss
    best_val_loss: float | None = None
    final_val_loss: float | None = None  # the periodic val loss at the last step
    selected_step: int | None = None     # the step whose weights the model holds on return
    eval_seconds: float = 0.0            # this session's time in periodic evaluations
    calibration: TemperatureFit | None = None   # the temperature fitted after training, if any

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_seen / self.seconds if self.seconds > 0 else 0.0

    def selection_metrics(self) -> dict[str, Any]:
        """What stopped the run and which step's weights were published: the metrics every
        training stage reports (metrics/<stage>.json)."""
        def r6(v: float | None) -> float | None:
            return None if v is None else round(v, 6)

        per_step = self.tokens_seen // max(1, self.step)
        return {"stopped_by": self.stopped_by, "selected_step": self.selected_step,
                "best_step": self.best_step, "best_val_loss": r6(self.best_val_loss),
                "final_val_loss": r6(self.final_val_loss),
                "selected_tokens": int(self.selected_step or 0) * per_step}


def _fmt_seconds(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 60}:{s % 60:02d}"


def stop_reason(cfg: Any, tokens_per_step: int, max_steps: int) -> str:
    """Which budget ends a run that reaches `max_steps`: max_steps or max_tokens."""
    by_tokens = (math.ceil(cfg.max_tokens / tokens_per_step) if cfg.max_tokens is not None
                 else None)
    return "max_tokens" if by_tokens is not None and by_tokens == max_steps and (
        cfg.max_steps is None or by_tokens < cfg.max_steps) else "max_steps"


class Trainer:
    """Train `model` on `batches` (anything with next(), state_dict(), load_state_dict()).

    `cfg` is a TrainParams section. `fingerprint` identifies the run for checkpoint resumes;
    `checkpoint_dir=None` disables checkpoints. `stop_after_step` ends the loop early without
    a final checkpoint, as a kill would (for tests).
    """

    def __init__(self, model: nn.Module, cfg: Any, *, batches: Any,
                 eval_batches: Sequence[Batch] = (), rt: Runtime | None = None,
                 logger: MetricLogger | None = None, checkpoint_dir: str | Path | None = None,
                 fingerprint: dict[str, Any] | None = None, name: str = "train",
                 tokens_per_batch: int | None = None, stop_after_step: int | None = None,
                 on_eval: Callable[[int, float], None] | None = None):
        self.rt = rt or setup_runtime(cfg.device, cfg.precision, cfg.threads)
        self.cfg = cfg
        self.model = model.to(self.rt.device)
        self.batches = batches
        self.eval_batches = list(eval_batches)
        self.logger = logger if logger is not None else NullLogger()
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.fingerprint = fingerprint or {}
        self.name = name
        self.stop_after_step = stop_after_step
        self.on_eval = on_eval
        tpb = tokens_per_batch or getattr(batches, "tokens_per_batch", None)
        if not tpb:
            raise ValueError("tokens_per_batch is needed (the batches do not say)")
        self.tokens_per_step = int(tpb) * cfg.grad_accum
        self.max_steps = self.resolve_max_steps(cfg, self.tokens_per_step)
        self.optimizers = build_optimizers(self.model, cfg, self.rt.device)
        self.train_model: nn.Module = self.model
        if cfg.compile:
            self.train_model = torch.compile(self.model)
        if self.rt.distributed:
            ddp_kwargs = {"device_ids": [self.rt.device.index]} if self.rt.device.type == "cuda" else {}
            self.train_model = nn.parallel.DistributedDataParallel(self.train_model, **ddp_kwargs)
        # run state (restored from a checkpoint)
        self.step = 0
        self.tokens_seen = 0
        self.elapsed = 0.0
        self.history: list[dict[str, Any]] = []
        self.last_val: float | None = None
        self.last_checkpoint: Path | None = None
        self.resumed_from: int | None = None
        self.best_step: int | None = None
        self.best_val: float | None = None
        self.best_state: dict[str, torch.Tensor] | None = None   # a CPU copy of the weights
        self.eval_seconds = 0.0
        self.stopped_by: str | None = None

    @staticmethod
    def resolve_max_steps(cfg: Any, tokens_per_step: int) -> int:
        limits = []
        if cfg.max_steps is not None:
            limits.append(int(cfg.max_steps))
        if cfg.max_tokens is not None:
            limits.append(max(1, math.ceil(cfg.max_tokens / tokens_per_step)))
        if not limits:
            raise InputError("train: set max_steps or max_tokens (max_seconds is a guard, not "
                             "a reproducible budget)")
        return min(limits)

    # -- schedule
    def lr(self) -> float:
        """The step's learning rate: a function of the step alone, never of the clock."""
        c = self.cfg
        return lr_at(self.step, lr=c.lr, min_lr=c.min_lr, warmup_steps=c.warmup_steps,
                     max_steps=self.max_steps)

    # -- model selection on validation
    def _track_best(self, val: float) -> None:
        """Keep a copy of the weights when `val` is the lowest periodic val loss so far."""
        if math.isfinite(val) and (self.best_val is None or val < self.best_val):
            self.best_val, self.best_step = val, self.step
            # kept whatever `select` says, so switching it never needs a retrain
            self.best_state = {k: v.detach().to("cpu", copy=True)
                               for k, v in self.model.state_dict().items()}

    def _restore_selected(self) -> int:
        """Load the weights `select` publishes; returns their step."""
        if self.cfg.select == "best" and self.best_state is not None:
            self.model.load_state_dict(self.best_state)
            return int(self.best_step)
        return self.step

    def _set_lr(self, lr: float) -> None:
        scale = lr / self.cfg.lr
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["lr"] = g.get("base_lr", self.cfg.lr) * scale

    # -- checkpoints
    def _state(self) -> dict[str, Any]:
        return {"name": self.name, "tokens_seen": self.tokens_seen, "elapsed": self.elapsed,
                "max_steps": self.max_steps, "loader": self.batches.state_dict(),
                "history": self.history, "last_val": self.last_val,
                "best_step": self.best_step, "best_val": self.best_val,
                "world_size": self.rt.world_size, "fingerprint": self.fingerprint}

    def save(self) -> Path | None:
        if self.checkpoint_dir is None:
            return None
        rng = ckpt.capture_rng()
        if self.rt.distributed:
            gathered: list[Any] = [None] * self.rt.world_size
            dist.all_gather_object(gathered, rng)
            rng = gathered
        else:
            rng = [rng]
        path = None
        if self.rt.is_main:
            path = ckpt.save_checkpoint(self.checkpoint_dir, self.step, self.model, self.optimizers,
                                        self._state(), rng, keep=self.cfg.keep_checkpoints,
                                        best=self.best_state)
        if self.rt.distributed:
            dist.barrier()
        self.last_checkpoint = self.checkpoint_dir / f"step-{self.step:08d}"
        return path

    def resume(self) -> int | None:
        """Load the newest checkpoint of this run, if any; returns its step."""
        if self.checkpoint_dir is None:
            return None
        # Every rank reads the same folder (multi-node: a shared file system); rank 0 alone
        # tidies it, between two barriers so that no rank lists it mid-change.
        if self.rt.is_main:
            ckpt.clean_leftovers(self.checkpoint_dir)
        if self.rt.distributed:
            dist.barrier()
        found = ckpt.find_resumable(self.checkpoint_dir, self.fingerprint)
        if found.stale and self.rt.is_main:
            where = ckpt.set_aside(found.stale)
            note(f"{self.name}: not resuming from {len(found.stale)} checkpoint(s) of "
                 f"another run ({found.reason}); moved them to {where} and starting fresh")
        if self.rt.distributed:
            dist.barrier()
        if found.path is None:
            return None
        state, rng = ckpt.load_checkpoint(found.path, self.model, self.optimizers)
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.elapsed = float(state["elapsed"])
        self.history = list(state.get("history", []))
        self.last_val = state.get("last_val")
        self.best_step, self.best_val = state.get("best_step"), state.get("best_val")
        if self.best_step is not None:
            self.best_state = ckpt.load_best(found.path)
        self.batches.load_state_dict(state["loader"])
        if isinstance(rng, list) and len(rng) == self.rt.world_size:
            ckpt.restore_rng(rng[self.rt.rank])
        elif isinstance(rng, list) and rng:
            ckpt.restore_rng(rng[0])
        self.last_checkpoint = found.path
        self.resumed_from = self.step
        note(f"{self.name}: resuming from {found.path} (step {self.step} of "
             f"{self.max_steps}, {_fmt_seconds(self.elapsed)} trained)")
        return self.step

    # -- the loop
    def _clock(self, base: float, t_session: float) -> float:
        """Wall seconds of the run so far; under DDP the slowest rank's, so that every rank
        takes the same max_seconds decision."""
        elapsed = base + (time.perf_counter() - t_session)
        if self.rt.distributed and self.cfg.max_seconds is not None:
            t = torch.tensor([elapsed], dtype=torch.float64, device=self.rt.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            elapsed = float(t)
        return elapsed

    def _done(self) -> bool:
        if self.step >= self.max_steps:
            self.stopped_by = stop_reason(self.cfg, self.tokens_per_step, self.max_steps)
            return True
        if self.cfg.max_seconds is not None and self.elapsed >= self.cfg.max_seconds:
            self.stopped_by = "max_seconds"
            return True
        return False

    def _non_finite(self, what: str, value: float) -> NonFiniteLossError:
        step = self.step + 1
        if self.last_checkpoint is not None:
            kept = f"the last good checkpoint is kept: {self.last_checkpoint} (step {self.step})"
        else:
            kept = "no checkpoint had been written yet"
        return NonFiniteLossError(
            f"{self.name}: non-finite {what} ({value}) at step {step}; training stopped, "
            f"{kept}. Lower train.lr, raise warmup_steps or use precision: fp32.")

    def accumulate_gradients(self) -> float:
        """Forward/backward over grad_accum micro-batches; returns the mean loss (all ranks).

        Each micro-batch's mean loss is divided by grad_accum, so the accumulated gradient is
        the gradient of the mean over the whole (global) batch: the big-batch gradient.
        """
        cfg, rt = self.cfg, self.rt
        loss_sum = torch.zeros((), device=rt.device, dtype=torch.float32)
        for micro in range(cfg.grad_accum):
            x, y = self.batches.next()
            x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
            sync = micro == cfg.grad_accum - 1
            ctx = (self.train_model.no_sync() if rt.distributed and not sync
                   else contextlib.nullcontext())
            with ctx:
                with rt.autocast():
                    _, loss = self.train_model(x, y)
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach().float()
        mean = loss_sum / cfg.grad_accum
        if rt.distributed:
            dist.all_reduce(mean)
            mean /= rt.world_size
        return float(mean)

    def train_step(self) -> tuple[float, float]:
        """One optimizer step; returns (mean loss, grad norm before clipping)."""
        cfg = self.cfg
        value = self.accumulate_gradients()
        if not math.isfinite(value):
            raise self._non_finite("training loss", value)
        params = [p for opt in self.optimizers for g in opt.param_groups for p in g["params"]]
        grads = [p for p in params if p.grad is not None]
        if cfg.grad_clip > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(grads, cfg.grad_clip))
        else:
            norm = float(torch.nn.utils.get_total_norm([p.grad for p in grads]))
        if not math.isfinite(norm):
            raise self._non_finite("gradient norm", norm)
        for opt in self.optimizers:
            opt.step()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        return value, norm

    def check_replicas(self) -> None:
        """Under DDP: every rank must hold bit-identical weights (else raise)."""
        if not self.rt.distributed:
            return
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1).double().cpu()
                              for p in self.model.parameters()])
            sig = torch.stack([flat.sum(), (flat * flat).sum(),
                               (flat * torch.arange(flat.numel(), dtype=torch.float64)).sum()])
        gathered: list[Any] = [None] * self.rt.world_size
        dist.all_gather_object(gathered, sig.tolist())
        if any(g != gathered[0] for g in gathered):
            raise RuntimeError(f"{self.name}: DDP replicas diverged: weight signatures {gathered}")
        note(f"{self.name}: the {self.rt.world_size} DDP replicas hold identical weights")

    def fit(self) -> TrainResult:
        """Train to the budget (resuming this run's newest checkpoint); the model then holds
        the weights `select` chose."""
        cfg, rt = self.cfg, self.rt
        self.resume()
        self.model.train()
        bar = progress(total=self.max_steps, initial=self.step, desc=self.name, unit="step",
                       disable=not (cfg.progress and rt.is_main), dynamic_ncols=True,
                       mininterval=1.0)
        clock = _SessionClock(self.elapsed, self.step)
        window: list[float] = [h["train_loss"] for h in self.history[-cfg.log_every:]]
        try:
            while not self._done():
                if self.stop_after_step is not None and self.step >= self.stop_after_step:
                    return self._result(window, self.step)
                lr = self.lr()
                self._set_lr(lr)
                loss, gnorm = self.train_step()
                self.step += 1
                self.tokens_seen += self.tokens_per_step
                clock.tokens += self.tokens_per_step
                self.elapsed = self._clock(clock.base, clock.start)
                row: dict[str, Any] = {"step": self.step, "tokens": self.tokens_seen,
                                       "train_loss": loss, "val_loss": None, "lr": lr}
                self.history.append(row)
                window = (window + [loss])[-cfg.log_every:]
                last = self._done()
                if self.eval_batches and (self.step % cfg.eval_every == 0 or last):
                    self._evaluate(row)
                    self.elapsed = self._clock(clock.base, clock.start)
                tps = clock.tokens_per_second()
                if self.step % cfg.log_every == 0 or last:
                    self.logger.log_metrics({"train_loss": sum(window) / len(window), "lr": lr,
                                             "grad_norm": gnorm, "tokens_per_second": tps},
                                            step=self.step)
                if rt.is_main and cfg.progress:
                    bar.set_postfix(self._progress(loss, tps, clock), refresh=False)
                    bar.update(1)
                if self.step % cfg.checkpoint_every == 0 and not last:
                    self.save()
            self.check_replicas()
            if self.last_checkpoint is None or not self.last_checkpoint.name.endswith(
                    f"{self.step:08d}"):
                self.save()
        finally:
            bar.close()
        return self._finish(window)

    def _evaluate(self, row: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        self.last_val = evaluate_loss(self.model, self.eval_batches, self.rt)
        self.eval_seconds += time.perf_counter() - t0
        row["val_loss"] = self.last_val
        self._track_best(self.last_val)
        self.logger.log_metrics({"val_loss": self.last_val}, step=self.step)
        if self.on_eval is not None:
            self.on_eval(self.step, self.last_val)

    def _progress(self, loss: float, tps: float, clock: "_SessionClock") -> dict[str, str]:
        post = {"loss": f"{loss:.3f}", "tok/s": f"{tps:,.0f}"}
        if self.last_val is not None:
            post["val"] = f"{self.last_val:.3f}"
        left = clock.seconds_per_step(self.step) * (self.max_steps - self.step)
        if self.cfg.max_seconds is not None:
            left = min(self.cfg.max_seconds - self.elapsed, left)
        post["left"] = _fmt_seconds(left)
        return post

    def _finish(self, window: list[float]) -> TrainResult:
        if self.stopped_by == "max_seconds":
            warnings.warn(
                f"{self.name}: stopped by train.max_seconds ({self.cfg.max_seconds:g} s) at step "
                f"{self.step} of {self.max_steps}: this model depends on the machine's speed "
                "and is not reproducible; remove train.max_seconds to train on the token budget",
                RuntimeWarning, stacklevel=2)
            note(f"WARNING: {self.name}: stopped by train.max_seconds at step {self.step} of "
                 f"{self.max_steps} (not reproducible)")
        selected = self._restore_selected()
        if self.best_step is not None and selected != self.step:
            note(f"{self.name}: publishing the weights of step {selected} (val loss "
                 f"{self.best_val:.4f}); the last step {self.step} had {self.last_val:.4f}")
        return self._result(window, selected)

    def _result(self, window: list[float], selected: int) -> TrainResult:
        train_loss = sum(window) / len(window) if window else float("nan")
        chosen_val = self.best_val if selected != self.step else self.last_val
        return TrainResult(step=self.step, tokens_seen=self.tokens_seen, train_loss=train_loss,
                           val_loss=chosen_val, seconds=self.elapsed,
                           resumed_from=self.resumed_from, history=self.history,
                           stopped_by=self.stopped_by or "interrupted",
                           best_step=self.best_step, best_val_loss=self.best_val,
                           final_val_loss=self.last_val, selected_step=selected,
                           eval_seconds=self.eval_seconds)


@dataclass
class _SessionClock:
    """Wall time and tokens of this session (since the start or the resume): tokens/s and
    the ETA in the progress bar. Never used for any decision that shapes the weights."""

    base: float                    # elapsed seconds carried over from a checkpoint
    first_step: int
    start: float = field(default_factory=lambda: time.perf_counter())
    tokens: int = 0

    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def tokens_per_second(self) -> float:
        s = self.seconds()
        return self.tokens / s if s > 0 else 0.0

    def seconds_per_step(self, step: int) -> float:
        return self.seconds() / max(1, step - self.first_step)

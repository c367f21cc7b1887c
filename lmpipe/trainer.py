"""The shared trainer: one loop for every neural stage (rnn, pretrain; sft and lora reuse it).

What one optimizer step does
----------------------------
    lr_t  = schedule(step)                 linear warmup, then cosine decay to min_lr
    for each of grad_accum micro-batches:  loss_i = model(x_i, y_i) under bf16 autocast
        (loss_i / grad_accum).backward()   grads add up to the big-batch gradient
    stop if the mean loss is not finite    (names the step; the last good checkpoint stays)
    clip the global grad norm to grad_clip
    AdamW step (and Muon for the hidden matrices when optimizer: muon)

Parameter groups (decided here, once, for every model)
    * weight decay (decoupled, AdamW-style) applies to *matrices*: every parameter with two or
      more dimensions except embedding tables. Gains, biases and other vectors never decay;
      embeddings do not either (decaying them pulls rare tokens' rows to zero, and with tied
      weights the output head is the same tensor, so it follows the embedding). An untied
      output head is an ordinary matrix and decays.
    * optimizer: muon puts the 2-D *hidden* matrices (attention and MLP weights, recurrent
      weights) on `torch.optim.Muon` (orthogonalised momentum, `adjust_lr_fn="match_rms_adamw"`
      so the AdamW learning rate carries over); embeddings, the output head, gains and biases
      stay on AdamW.

Schedule: ``lr(step) = lr * (step + 1) / warmup`` for the first ``warmup_steps`` steps, then
``min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2`` where p runs from 0 to 1 over the remaining
steps. With a wall-clock budget (``max_seconds``) p is the larger of the step fraction and the
time fraction, so the decay ends when the budget does, whichever comes first.

Budget: ``max_steps`` and/or ``max_tokens`` (global tokens, all ranks and micro-batches),
whichever is smaller, and optionally ``max_seconds`` of wall time (checkpoint resumes carry the
elapsed time over). A run that stops on ``max_seconds`` is not reproducible step for step
(the step count depends on the machine's speed); a step or token budget is.

Checkpoints (lmpipe/checkpoint.py) every ``checkpoint_every`` steps and at the end; re-running
resumes from the newest one of the same run. On CPU with the same params, a killed-then-
resumed run ends with byte-identical weights to an uninterrupted one: the batch order is a
pure function of (seed, epoch, index), every RNG state is restored, and CPU kernels are
deterministic for a fixed thread count (keep ``threads`` the same across the two runs).

Data parallelism: under ``torchrun`` (WORLD_SIZE > 1) the model is wrapped in
DistributedDataParallel (gloo on CPU, nccl on CUDA); every rank reads its slice of the same
global batch, rank 0 alone logs, writes checkpoints and plots.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lmpipe import checkpoint as ckpt
from lmpipe.errors import InputError
from lmpipe.tracking import MetricLogger, NullLogger

IGNORE_INDEX = -100
Batch = tuple[torch.Tensor, torch.Tensor]


class NonFiniteLossError(InputError):
    """The loss (or gradient) became NaN/inf. Exit 2: retrying the same deterministic run
    would meet it again; the usual cure is a lower lr or fp32."""


# ----------------------------------------------------------------------------- runtime
@dataclass
class Runtime:
    """Where and how this process trains: device, precision, rank, world size."""

    device: torch.device
    dtype: torch.dtype | None          # autocast dtype (None = plain fp32)
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    threads: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def precision(self) -> str:
        return "bf16" if self.dtype == torch.bfloat16 else "fp32"

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


def cpu_supports_bf16() -> bool:
    """AVX512-BF16 or AMX: oneDNN then runs bf16 matmuls natively (else they are emulated)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_device(pref: str = "auto", local_rank: int = 0) -> torch.device:
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise InputError("train.device: 'cuda' was asked for but no CUDA device is available")
        return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    if pref not in ("auto", "cpu"):
        raise InputError(f"train.device: expected auto, cpu or cuda, got {pref!r}")
    return torch.device("cpu")


def resolve_precision(pref: str, device: torch.device) -> torch.dtype | None:
    if pref == "fp32":
        return None
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
    else:
        ok = cpu_supports_bf16()
    if pref == "bf16":
        if device.type == "cuda" and not ok:
            raise InputError("train.precision: bf16 was asked for but this GPU does not support it")
        return torch.bfloat16   # on a CPU without native bf16 it still runs (emulated, slow)
    return torch.bfloat16 if ok else None


def setup_runtime(device: str = "auto", precision: str = "auto", threads: int = 0) -> Runtime:
    """Pick the device and precision, join the process group under torchrun, set threads."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    n_threads = threads or max(1, (os.cpu_count() or 1) // max(1, local_world))
    torch.set_num_threads(n_threads)
    return Runtime(dev, resolve_precision(precision, dev), rank, world, local_rank, n_threads)


def teardown_runtime(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- schedule
def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int,
          progress: float | None = None) -> float:
    """Learning rate for optimizer step `step` (0-based: the step about to be taken).

    Linear warmup from lr/warmup to lr over `warmup_steps` steps, then cosine decay from lr
    to min_lr; `progress` (0..1) overrides the step-based decay fraction (time budgets).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if progress is None:
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    p = min(1.0, max(0.0, progress))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * p))


# ----------------------------------------------------------------------------- param groups
def _embedding_params(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def _head_params(model: nn.Module) -> set[int]:
    """The output projection: a module attribute named `head`/`lm_head`, or any matrix with
    vocab_size rows."""
    ids = set()
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 2)
        if p.ndim == 2 and (name in ("head.weight", "lm_head.weight")
                            or (len(leaf) >= 2 and leaf[-2] in ("head", "lm_head"))
                            or (vocab is not None and p.shape[0] == vocab)):
            ids.add(id(p))
    return ids


@dataclass
class ParamGroups:
    decay: list[nn.Parameter] = field(default_factory=list)      # AdamW, weight decay
    no_decay: list[nn.Parameter] = field(default_factory=list)   # AdamW, no decay
    muon: list[nn.Parameter] = field(default_factory=list)       # Muon (hidden matrices)
    names: dict[str, list[str]] = field(default_factory=dict)


def param_groups(model: nn.Module, use_muon: bool = False) -> ParamGroups:
    """Split the trainable parameters (each shared tensor once) into the optimizer groups."""
    emb, head = _embedding_params(model), _head_params(model)
    g = ParamGroups(names={"decay": [], "no_decay": [], "muon": []})
    for name, p in model.named_parameters():   # tied tensors are yielded once
        if not p.requires_grad:
            continue
        if p.ndim < 2 or id(p) in emb:
            key = "no_decay"
        elif use_muon and p.ndim == 2 and id(p) not in head:
            key = "muon"
        else:
            key = "decay"
        getattr(g, key).append(p)
        g.names[key].append(name)
    return g


def build_optimizers(model: nn.Module, cfg: Any, device: torch.device) -> list[torch.optim.Optimizer]:
    """AdamW (+ Muon) with per-group `base_lr`; the schedule scales every group's lr."""
    groups = param_groups(model, use_muon=cfg.optimizer == "muon")
    adam_groups = []
    if groups.decay:
        adam_groups.append({"params": groups.decay, "weight_decay": cfg.weight_decay,
                            "base_lr": cfg.lr})
    if groups.no_decay:
        adam_groups.append({"params": groups.no_decay, "weight_decay": 0.0, "base_lr": cfg.lr})
    opts: list[torch.optim.Optimizer] = []
    if adam_groups:
        kwargs: dict[str, Any] = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps}
        if device.type == "cuda":
            kwargs["fused"] = True
        opts.append(torch.optim.AdamW(adam_groups, **kwargs))
    if groups.muon:
        muon_lr = cfg.muon_lr if cfg.muon_lr is not None else cfg.lr
        opts.append(torch.optim.Muon(
            [{"params": groups.muon, "base_lr": muon_lr}], lr=muon_lr,
            weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum,
            adjust_lr_fn="match_rms_adamw"))
    if not opts:
        raise InputError("the model has no trainable parameters")
    return opts


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
    val_loss: float | None       # the last periodic val loss on the fixed eval batches
    seconds: float               # wall time of the whole run, resumed parts included
    resumed_from: int | None
    history: list[dict[str, Any]]

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_seen / self.seconds if self.seconds > 0 else 0.0


def _fmt_seconds(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 60}:{s % 60:02d}"


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
        self.logger = logger if (logger is not None and self.rt.is_main) else NullLogger()
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
        self.warmup_elapsed: float | None = None
        self.history: list[dict[str, Any]] = []
        self.last_val: float | None = None
        self.last_checkpoint: Path | None = None
        self.resumed_from: int | None = None

    @staticmethod
    def resolve_max_steps(cfg: Any, tokens_per_step: int) -> int:
        limits = []
        if cfg.max_steps is not None:
            limits.append(int(cfg.max_steps))
        if cfg.max_tokens is not None:
            limits.append(max(1, math.ceil(cfg.max_tokens / tokens_per_step)))
        if not limits:
            raise InputError("train: set max_steps or max_tokens (max_seconds alone is not a "
                             "reproducible budget)")
        return min(limits)

    # -- schedule
    def progress(self) -> float | None:
        """Decay fraction with a time budget (None: purely step-based)."""
        cfg = self.cfg
        if cfg.max_seconds is None or self.step < cfg.warmup_steps:
            return None
        start = self.warmup_elapsed or 0.0
        by_time = (self.elapsed - start) / max(1e-9, cfg.max_seconds - start)
        by_step = (self.step - cfg.warmup_steps) / max(1, self.max_steps - cfg.warmup_steps)
        return max(by_time, by_step)

    def lr(self) -> float:
        c = self.cfg
        return lr_at(self.step, lr=c.lr, min_lr=c.min_lr, warmup_steps=c.warmup_steps,
                     max_steps=self.max_steps, progress=self.progress())

    def _set_lr(self, lr: float) -> None:
        scale = lr / self.cfg.lr
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["lr"] = g.get("base_lr", self.cfg.lr) * scale

    # -- checkpoints
    def _state(self) -> dict[str, Any]:
        return {"name": self.name, "tokens_seen": self.tokens_seen, "elapsed": self.elapsed,
                "warmup_elapsed": self.warmup_elapsed, "max_steps": self.max_steps,
                "loader": self.batches.state_dict(), "history": self.history,
                "last_val": self.last_val, "world_size": self.rt.world_size,
                "fingerprint": self.fingerprint}

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
                                        self._state(), rng, keep=self.cfg.keep_checkpoints)
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
            ckpt.note(f"{self.name}: not resuming from {len(found.stale)} checkpoint(s) of "
                      f"another run ({found.reason}); moved them to {where} and starting fresh")
        if self.rt.distributed:
            dist.barrier()
        if found.path is None:
            return None
        state, rng = ckpt.load_checkpoint(found.path, self.model, self.optimizers)
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.elapsed = float(state["elapsed"])
        self.warmup_elapsed = state.get("warmup_elapsed")
        self.history = list(state.get("history", []))
        self.last_val = state.get("last_val")
        self.batches.load_state_dict(state["loader"])
        if isinstance(rng, list) and len(rng) == self.rt.world_size:
            ckpt.restore_rng(rng[self.rt.rank])
        elif isinstance(rng, list) and rng:
            ckpt.restore_rng(rng[0])
        self.last_checkpoint = found.path
        self.resumed_from = self.step
        if self.rt.is_main:
            ckpt.note(f"{self.name}: resuming from {found.path} (step {self.step} of "
                      f"{self.max_steps}, {_fmt_seconds(self.elapsed)} trained)")
        return self.step

    # -- the loop
    def _clock(self, base: float, t_session: float) -> float:
        """Wall seconds of the run so far; under DDP the slowest rank's, so that every rank
        takes the same stop decision and computes the same time-based lr."""
        elapsed = base + (time.perf_counter() - t_session)
        if self.rt.distributed and self.cfg.max_seconds is not None:
            t = torch.tensor([elapsed], dtype=torch.float64, device=self.rt.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            elapsed = float(t)
        return elapsed

    def _done(self) -> bool:
        if self.step >= self.max_steps:
            return True
        return self.cfg.max_seconds is not None and self.elapsed >= self.cfg.max_seconds

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
        if self.rt.is_main:
            ckpt.note(f"{self.name}: the {self.rt.world_size} DDP replicas hold identical weights")

    def fit(self) -> TrainResult:
        from tqdm.auto import tqdm

        cfg, rt = self.cfg, self.rt
        self.resume()
        self.model.train()
        bar = tqdm(total=self.max_steps, initial=self.step, desc=self.name, unit="step",
                   disable=not (cfg.progress and rt.is_main), dynamic_ncols=True,
                   mininterval=1.0, file=sys.stderr)
        t_session = time.perf_counter()
        base_elapsed = self.elapsed
        session_tokens, session_start_step = 0, self.step
        window: list[float] = [h["train_loss"] for h in self.history[-cfg.log_every:]]
        try:
            while not self._done():
                if self.stop_after_step is not None and self.step >= self.stop_after_step:
                    return self._result(window)
                lr = self.lr()
                self._set_lr(lr)
                loss, gnorm = self.train_step()
                self.step += 1
                self.tokens_seen += self.tokens_per_step
                session_tokens += self.tokens_per_step
                self.elapsed = self._clock(base_elapsed, t_session)
                if self.warmup_elapsed is None and self.step >= cfg.warmup_steps:
                    self.warmup_elapsed = self.elapsed
                row: dict[str, Any] = {"step": self.step, "tokens": self.tokens_seen,
                                       "train_loss": loss, "val_loss": None, "lr": lr}
                self.history.append(row)
                window = (window + [loss])[-cfg.log_every:]
                last = self._done()
                if self.eval_batches and (self.step % cfg.eval_every == 0 or last):
                    self.last_val = evaluate_loss(self.model, self.eval_batches, rt)
                    row["val_loss"] = self.last_val
                    self.logger.log_metrics({"val_loss": self.last_val}, step=self.step)
                    if self.on_eval is not None:
                        self.on_eval(self.step, self.last_val)
                    self.elapsed = self._clock(base_elapsed, t_session)
                run_s = time.perf_counter() - t_session
                tps = session_tokens / run_s if run_s > 0 else 0.0
                if self.step % cfg.log_every == 0 or last:
                    self.logger.log_metrics({"train_loss": sum(window) / len(window), "lr": lr,
                                             "grad_norm": gnorm, "tokens_per_second": tps},
                                            step=self.step)
                if rt.is_main and cfg.progress:
                    post = {"loss": f"{loss:.3f}", "tok/s": f"{tps:,.0f}"}
                    if self.last_val is not None:
                        post["val"] = f"{self.last_val:.3f}"
                    if cfg.max_seconds is not None:
                        per_step = run_s / max(1, self.step - session_start_step)
                        left = min(cfg.max_seconds - self.elapsed,
                                   per_step * (self.max_steps - self.step))
                        post["left"] = _fmt_seconds(left)
                    bar.set_postfix(post, refresh=False)
                    bar.update(1)
                if self.step % cfg.checkpoint_every == 0 and not last:
                    self.save()
            self.check_replicas()
            if self.last_checkpoint is None or not self.last_checkpoint.name.endswith(
                    f"{self.step:08d}"):
                self.save()
        finally:
            bar.close()
        return self._result(window)

    def _result(self, window: list[float]) -> TrainResult:
        train_loss = sum(window) / len(window) if window else float("nan")
        return TrainResult(step=self.step, tokens_seen=self.tokens_seen, train_loss=train_loss,
                           val_loss=self.last_val, seconds=self.elapsed,
                           resumed_from=self.resumed_from, history=self.history)


# ----------------------------------------------------------------------------- LM stages
# Train params that do not change the trajectory: changing them keeps the checkpoints usable.
OPERATIONAL_KEYS = frozenset({"progress", "log_every", "eval_every", "eval_batches",
                              "checkpoint_every", "keep_checkpoints", "threads", "compile",
                              "device"})


def data_digest(tokens_dir: Path, split: str = "train") -> dict[str, Any]:
    """A cheap identity of the training data: meta.json's hash, the file's size and the
    hash of its first and last MiB (hashing a large corpus in full would cost minutes)."""
    import hashlib

    h = hashlib.sha256()
    meta = tokens_dir / "meta.json"
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
    train = {k: v for k, v in train_cfg.model_dump(mode="json").items()
             if k not in OPERATIONAL_KEYS}
    return {"model_type": model_type, "model": model_config, "train": train,
            "context_length": int(context_length), "seed": int(seed),
            "world_size": int(world_size), "data": data}


def train_language_model(stage: str, *, model_type: str, model_params: dict[str, Any],
                         context_length: int, train_cfg: Any, seed: int, experiment: str,
                         out_name: str, params_for_log: dict[str, Any] | None = None) -> dict:
    """The whole `rnn` / `pretrain` stage: tokens in; model, checkpoints, plots, metrics out.

    Returns the metrics written to metrics/<stage>.json (rank 0; {} on the other ranks).
    """
    from lmpipe import paths
    from lmpipe.batches import TokenBatches, eval_batches, read_meta, read_tokens
    from lmpipe.evaluation import score_windows
    from lmpipe.metrics import bits_per_byte, perplexity, write_metrics
    from lmpipe.models import build_model, count_parameters, save_model
    from lmpipe.plots import write_loss_plots
    from lmpipe.stage import seed_everything
    from lmpipe.tracking import stage_logger

    rt = setup_runtime(train_cfg.device, train_cfg.precision, train_cfg.threads)
    try:
        meta = read_meta()
        train_tokens, val_tokens = read_tokens("train"), read_tokens("val")
        vocab = int(meta["vocab_size"])
        eos_id = int(meta["eos_id"])
        val_bytes = int(meta["splits"]["val"]["bytes"])
        model_config = {"vocab_size": vocab, **model_params}
        seed_everything(seed)
        model = build_model(model_type, model_config)
        n_params = count_parameters(model)
        batches = TokenBatches(train_tokens, context_length, train_cfg.batch_size, seed,
                               rt.rank, rt.world_size, name="train")
        evals = eval_batches(val_tokens, context_length, train_cfg.batch_size,
                             train_cfg.eval_batches, name="val")
        fingerprint = run_fingerprint(model_type, model_config, train_cfg, context_length, seed,
                                      rt.world_size, data_digest(paths.tokens_dir()))
        logger_cm = (stage_logger(stage, experiment) if rt.is_main else NullLogger())
        with logger_cm as log:
            log.log_params({**(params_for_log or {}), "model_type": model_type,
                            "params": n_params, "device": str(rt.device),
                            "precision": rt.precision, "world_size": rt.world_size,
                            "threads": rt.threads})
            if rt.is_main:
                ckpt.note(f"{stage}: {model_type} with {n_params:,} parameters on "
                          f"{rt.device} ({rt.precision}, {rt.threads} threads, "
                          f"world size {rt.world_size}); {len(train_tokens):,} train tokens")
            trainer = Trainer(model, train_cfg, batches=batches, eval_batches=evals, rt=rt,
                              logger=log, checkpoint_dir=paths.checkpoints_dir() / stage,
                              fingerprint=fingerprint, name=stage)
            result = trainer.fit()
            if not rt.is_main:
                return {}
            # The stage's val figure: the whole val split under the scoring convention
            # (lmpipe.evaluation: [EOS] + ids, non-overlapping windows of context_length), fp32.
            t0 = time.perf_counter()
            total_nll = score_windows(model.eval(), val_tokens, context_length, eos_id=eos_id,
                                      batch_size=max(1, train_cfg.batch_size), dtype="float32")
            score_s = time.perf_counter() - t0
            n_val = int(len(val_tokens))
            metrics = {
                "train_loss": round(result.train_loss, 6),
                "val_loss": round(total_nll / n_val, 6),
                "val_ppl": round(perplexity(total_nll, n_val), 6),
                "val_bpb": round(bits_per_byte(total_nll, val_bytes), 6),
                "val_tokens": n_val,
                "val_bytes": val_bytes,
                "params": int(n_params),
                "steps": int(result.step),
                "tokens_seen": int(result.tokens_seen),
                "epochs": round(result.tokens_seen / max(1, len(train_tokens)), 4),
                "train_seconds": round(result.seconds, 3),
                "tokens_per_second": round(result.tokens_per_second, 1),
                "score_seconds": round(score_s, 3),
            }
            out_dir = paths.models_dir() / out_name
            save_model(model, out_dir, model_type, model_config,
                       extra={"context_length": int(context_length), "stage": stage,
                              "eos_id": eos_id, "trained_steps": int(result.step),
                              "tokens_seen": int(result.tokens_seen)})
            plot_files = write_loss_plots(paths.plots_dir(stage), result.history,
                                          title=f"{stage}: {model_type}, {n_params:,} params")
            written = write_metrics(stage, metrics)
            log.log_metrics({k: v for k, v in written.items() if isinstance(v, (int, float))},
                            step=result.step)
            for f in (*plot_files.values(), out_dir / "config.json"):
                log.log_artifact(f)
            ckpt.note(f"{stage}: val loss {metrics['val_loss']:.4f} nats/token, "
                      f"{metrics['val_bpb']:.4f} bits/byte; {metrics['tokens_seen']:,} tokens in "
                      f"{metrics['train_seconds']:.0f} s ({metrics['tokens_per_second']:,.0f} tok/s)")
            return written
    finally:
        teardown_runtime(rt)

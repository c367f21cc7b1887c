"""Where and how a training process runs: device, precision, rank and world size, threads,
and a malloc that keeps freed memory (`keep_freed_memory`).

Under `torchrun` (WORLD_SIZE > 1) the process joins the process group (gloo on CPU, nccl on
CUDA) and each rank takes its local device. Precision `auto` is bf16 autocast where the
hardware has native bf16 (CUDA, or a CPU with AVX512-BF16 or AMX), else fp32; weights and
optimizer state stay fp32 either way.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist

from lmpipe.core.errors import InputError
from lmpipe.core.machine import cpu_flags


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's global generators (model init, dropout)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


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


NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}   # x86 AVX512-BF16, AMX; arm64 BF16


def cpu_supports_bf16() -> bool:
    """Native bf16 instructions (x86: AVX512-BF16 or AMX; arm64: BF16), from the CPU's own
    flags. oneDNN's own check also says yes on AVX512 cores that only emulate bf16, where
    bf16 autocast is slower than fp32; it is the fallback where /proc/cpuinfo is missing."""
    flags = cpu_flags()
    if flags is None:
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return bool(flags & NATIVE_BF16_FLAGS)


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
    if device.type == "cuda":   # native from Ampere (8.0) on; older GPUs emulate it
        ok = torch.cuda.is_bf16_supported(including_emulation=False)
    else:
        ok = cpu_supports_bf16()
    if pref == "bf16":
        if device.type == "cuda" and not ok:
            raise InputError("train.precision: bf16 was asked for but this GPU does not support it")
        return torch.bfloat16   # on a CPU without native bf16 it still runs (emulated, slow)
    return torch.bfloat16 if ok else None


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of handing it back to the OS.

    A training step allocates and frees the same activations and gradients every time. By
    default glibc serves large blocks with fresh mmap'd pages and trims the heap's top back to
    the OS, so each step faults its memory back in page by page: 23,000-33,000 minor faults a
    step on the default profile, 60 ms of kernel time. With the mmap threshold at its maximum
    (32 MiB on 64-bit) and trimming only above 256 MiB free, the faults went to ~0 and the step
    from a median of 571-583 ms to 510-523 (AMD EPYC Zen 5, 2 threads, the machine shared with
    another run). Where memory comes from changes, not what is computed: the numbers are the
    same. Linux with glibc only; elsewhere (macOS, musl) nothing is changed and it returns False.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # glibc's <malloc.h>
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 256 << 20))


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
    keep_freed_memory()
    return Runtime(dev, resolve_precision(precision, dev), rank, world, local_rank, n_threads)


def teardown_runtime(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def training_runtime(cfg) -> Iterator[Runtime]:
    """`with training_runtime(train_params) as rt:` - set up, and always leave the process
    group cleanly (a rank that raises must not leave the others waiting at a barrier)."""
    rt = setup_runtime(cfg.device, cfg.precision, cfg.threads)
    try:
        yield rt
    finally:
        teardown_runtime(rt)

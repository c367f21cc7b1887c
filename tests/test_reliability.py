"""Faults: SIGKILL at random points, MLflow unavailable, disk full while checkpointing.

The SIGKILL tests run the real stages (`python -m stages.<name>`) in scratch projects and
kill the whole process group at seeded random moments, several times per stage, while a
watcher thread reads the published outputs: every file it can see must be complete (equal
to the uninterrupted run's). The rerun must complete and produce exactly the uninterrupted
run's outputs (the pretrain stage resumes from its last checkpoint).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from lmpipe.core.profiles import deep_merge, dump_params, profile_dict

# Heavy: real stages, DVC repos or a Prefect server (`make test-fast` leaves them out).
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# Small enough to run each stage in seconds; pretrain writes several checkpoints to resume from.
TINY = {
    "download": {"max_bytes": 60000, "instruct": {"max_rows": 40}},
    "ngram": {"sample_tokens": 0},
    "pretrain": {
        "model": {"context_length": 32, "n_layer": 1, "n_head": 2, "d_model": 32},
        "train": {"batch_size": 4, "max_steps": 40, "warmup_steps": 2, "eval_every": 4,
                  "eval_batches": 1, "checkpoint_every": 4, "log_every": 1,
                  "keep_checkpoints": 2, "progress": False},
    },
}
STAGES = ("download", "tokenizer", "ngram", "pretrain")
OUTS = {   # what each stage publishes (metrics compared without their wall-clock fields)
    "download": ["data/corpus", "data/instruct", "metrics/download.json"],
    "tokenizer": ["data/tokenizer", "data/tokens", "metrics/tokenizer.json"],
    "ngram": ["data/models/ngram", "metrics/ngram.json"],
    "pretrain": ["data/models/transformer", "plots/pretrain/loss.csv", "metrics/pretrain.json"],
}
KILLS_PER_STAGE = 3
SEED = 8


def timing_key(key: str) -> bool:
    """Wall-clock measurements: they differ between any two runs by nature."""
    return any(w in key for w in ("seconds", "per_second", "peak_rss", "elapsed"))


def content(path: Path) -> str:
    """A file's identity: its sha256, or for a metrics file its values minus timings."""
    data = path.read_bytes()
    if path.parent.name == "metrics" and path.suffix == ".json":
        obj = {k: v for k, v in json.loads(data).items() if not timing_key(k)}
        return "metrics:" + json.dumps(obj, sort_keys=True)
    return hashlib.sha256(data).hexdigest()


def published(root: Path, stage: str) -> dict[str, str]:
    """Every visible file the stage publishes (hidden temporaries excluded)."""
    out = {}
    for rel in OUTS[stage]:
        p = root / rel
        files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else []
        for f in files:
            r = f.relative_to(root)
            if any(part.startswith(".") for part in r.parts):
                continue
            try:
                out[r.as_posix()] = content(f)
            except FileNotFoundError:   # replaced between listing and reading: re-read next poll
                continue
    return out


def env_for(root: Path, mirror: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LMPIPE_", "MLFLOW_TRACKING"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(REPO),
               LMPIPE_ROOT=str(root), LMPIPE_MIRROR=str(mirror), LMPIPE_TRACKING="off", **extra)
    return env


def run_stage(root: Path, env: dict, stage: str, timeout: int = 600):
    return subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=timeout)


def must(proc) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, mirror):
    """The uninterrupted run: outputs and wall time of each stage."""
    root = tmp_path_factory.mktemp("uninterrupted")
    (root / "params.yaml").write_text(dump_params(deep_merge(profile_dict("smoke"), TINY)))
    env = env_for(root, mirror)
    seconds = {}
    for stage in STAGES:
        t0 = time.monotonic()
        must(run_stage(root, env, stage))
        seconds[stage] = time.monotonic() - t0
    return root, {s: published(root, s) for s in STAGES}, seconds


class Watcher(threading.Thread):
    """Reads the published outputs while a stage runs; records any file that is not complete."""

    def __init__(self, root: Path, stage: str, expected: dict[str, str]):
        super().__init__(daemon=True)
        self.root, self.stage, self.expected = root, stage, expected
        self.stop = threading.Event()
        self.bad: list[str] = []
        self.polls = 0

    def run(self) -> None:
        while not self.stop.is_set():
            for rel, digest in published(self.root, self.stage).items():
                if self.expected.get(rel) != digest:
                    self.bad.append(rel)
            self.polls += 1
            time.sleep(0.02)


def latest_step(root: Path) -> int:
    steps = [int(p.name[5:]) for p in (root / "data/checkpoints/pretrain").glob("step-*")
             if (p / "state.json").exists()] if (root / "data/checkpoints/pretrain").is_dir() else []
    return max(steps, default=0)


def written_files(root: Path) -> dict[str, tuple[int, int]]:
    """(mtime, size) of every file a stage could have written: data/ and metrics/, temporary
    files and checkpoints included."""
    out = {}
    for top in ("data", "metrics"):
        # os.walk, not rglob: a temporary folder the stage renames or removes mid-walk is
        # skipped (os.walk ignores a listing that fails), where rglob raised FileNotFoundError
        for folder, _dirs, files in os.walk(root / top):
            for name in files:
                p = Path(folder) / name
                try:
                    st = p.stat()
                except FileNotFoundError:      # a temporary renamed or removed meanwhile
                    continue
                out[p.relative_to(root).as_posix()] = (st.st_mtime_ns, st.st_size)
    return out


def kill_at(root: Path, env: dict, stage: str, delay: float,
            ready: Callable[[], bool]) -> tuple[bool, bool, str]:
    """Start the stage and SIGKILL its process group `delay` s after `ready()` turns true.
    Returns (whether it was still running when killed, whether `ready()` had turned true
    first, its stderr)."""
    log = root.parent / f"{stage}-killed.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", f"stages.{stage}"], cwd=root, env=env,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        deadline = time.monotonic() + 300
        was_ready = False
        while proc.poll() is None and time.monotonic() < deadline:
            if ready():
                was_ready = True
                break
            time.sleep(0.005)
        time.sleep(delay)
        alive = proc.poll() is None
        if alive:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    return alive, was_ready, log.read_text()


@pytest.mark.parametrize("stage", STAGES)
def test_sigkill_at_random_points_then_rerun_equals_uninterrupted(reference, tmp_path, mirror, stage):
    """Every kill lands while the stage is writing: after its first new file (a temporary,
    a checkpoint), never during imports, so each rerun meets what a kill leaves behind."""
    ref_root, ref_outs, _ = reference
    root = tmp_path / "killed"
    root.mkdir()
    shutil.copy(ref_root / "params.yaml", root / "params.yaml")
    for s in STAGES[: STAGES.index(stage)]:        # the upstream outputs, as DVC would have them
        for rel in OUTS[s]:
            src, dst = ref_root / rel, root / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
    env = env_for(root, mirror)
    rng = random.Random(f"{SEED}-{stage}")
    watcher = Watcher(root, stage, ref_outs[stage])
    watcher.start()
    kills, resumed_at = [], []
    try:
        for _ in range(KILLS_PER_STAGE):
            delay = rng.uniform(0.0, 0.1 if stage == "pretrain" else 0.3)
            for _attempt in range(8):
                if stage == "pretrain":     # kill mid-training: once a new checkpoint is written
                    start = latest_step(root)
                    ready = lambda start=start: latest_step(root) > start   # noqa: E731
                else:                       # once it wrote a file (a temporary) it had not before
                    before = written_files(root)
                    ready = lambda before=before: any(   # noqa: E731
                        before.get(k) != v for k, v in written_files(root).items())
                alive, wrote, log = kill_at(root, env, stage, delay, ready)
                if alive or not wrote:
                    break
                # A fast machine finished the stage within the delay: the kill must land while
                # it writes, so try again, sooner after the first write.
                delay /= 4
            kills.append((alive, wrote, round(delay, 3)))
            resumed_at += [int(m) for m in re.findall(r"resuming from \S+ \(step (\d+) of", log)]
        proc = run_stage(root, env, stage)
        resumed_at += [int(m) for m in re.findall(r"resuming from \S+ \(step (\d+) of", proc.stderr)]
    finally:
        watcher.stop.set()
        watcher.join()
    must(proc)
    print(f"{stage}: kills (landed, after a write, delay s): {kills}")
    assert all(alive and wrote for alive, wrote, _ in kills), (
        f"every kill must land after the stage wrote something: {kills}")
    assert watcher.polls > 10
    assert not watcher.bad, f"half-written or foreign outputs were visible: {sorted(set(watcher.bad))}"
    assert published(root, stage) == ref_outs[stage]
    leftovers = [*(root / "data").rglob("*.tmp"), *(root / "data").rglob(".*.old-*")]
    assert not leftovers, f"temporaries left after a successful rerun: {leftovers}"
    if stage == "pretrain":
        # every run after the first kill resumed, at least once from the middle of training
        assert len(resumed_at) == KILLS_PER_STAGE, (resumed_at, proc.stderr[-2000:])
        assert min(resumed_at) < 40, resumed_at
        print(f"pretrain: the reruns resumed at steps {resumed_at}")


# ----------------------------------------------------------------------------- MLflow down
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_warning(stderr: str, stage: str) -> None:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("WARNING: lmpipe: MLflow unavailable")]
    assert len(lines) == 1 and f"stage {stage!r}" in lines[0], stderr[-3000:]


@pytest.mark.parametrize("store", ["server-not-listening", "sqlite-locked", "sqlite-read-only",
                                   "sqlite-unwritable"])
def test_stage_completes_without_mlflow_and_keeps_its_metrics(reference, tmp_path, mirror, store):
    ref_root, ref_outs, _ = reference
    root = tmp_path / "p"
    root.mkdir()
    shutil.copy(ref_root / "params.yaml", root / "params.yaml")
    for s in ("download", "tokenizer"):
        for rel in OUTS[s]:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            src = ref_root / rel
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, root / rel)
    lock = None
    if store == "server-not-listening":
        uri = f"http://127.0.0.1:{free_port()}"
    elif store == "sqlite-locked":
        import sqlite3

        db = tmp_path / "locked.db"
        lock = sqlite3.connect(db, isolation_level=None, timeout=0)
        lock.execute("CREATE TABLE t (x)")
        lock.execute("BEGIN EXCLUSIVE")           # another writer holds the store
        uri = f"sqlite:///{db}"
    elif store == "sqlite-read-only":     # opened read-only (chmod means nothing to root)
        import sqlite3

        db = tmp_path / "ro.db"
        sqlite3.connect(db).close()
        uri = f"sqlite:///file:{db}?mode=ro&uri=true"
    else:
        (tmp_path / "not-a-folder").write_text("a file where the store's folder should be\n")
        uri = f"sqlite:///{tmp_path / 'not-a-folder' / 'mlflow.db'}"
    env = env_for(root, mirror, MLFLOW_TRACKING_URI=uri)
    env.pop("LMPIPE_TRACKING")
    t0 = time.monotonic()
    try:
        proc = run_stage(root, env, "ngram", timeout=300)
    finally:
        if lock is not None:
            lock.close()
    seconds = time.monotonic() - t0
    must(proc)
    _one_warning(proc.stderr, "ngram")
    assert published(root, "ngram") == ref_outs["ngram"]
    warning = next(ln for ln in proc.stderr.splitlines() if ln.startswith("WARNING: lmpipe"))
    print(f"{store}: stage completed in {seconds:.1f} s; {warning[:220]}")


# ----------------------------------------------------------------------------- disk full
def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import safetensors.torch
    import torch

    from lmpipe.models.store import build_model
    from lmpipe.train import checkpoint as ckpt

    torch.manual_seed(0)
    cfg = {"vocab_size": 64, "context_length": 8, "n_layer": 1, "n_head": 2, "d_model": 16}
    model = build_model("transformer", cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    folder = tmp_path / "checkpoints"
    x = torch.randint(0, 64, (2, 8))
    out = model(x)
    logits = out[0] if isinstance(out, tuple) else out
    logits.float().mean().backward()
    opt.step()
    first = ckpt.save_checkpoint(folder, 1, model, [opt], {"tokens_seen": 16}, [ckpt.capture_rng()])
    saved = {k: v.clone() for k, v in model.state_dict().items()}

    with torch.no_grad():                      # the model moves on; the next save hits a full disk
        for p in model.parameters():
            p.add_(1.0)
    real_save = safetensors.torch.save_model

    def full_disk(m, filename, *a, **kw):
        real_save(m, filename, *a, **kw)
        size = os.path.getsize(filename)
        with open(filename, "r+b") as f:        # only the first part reached the disk
            f.truncate(size // 3)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(safetensors.torch, "save_model", full_disk)
    with pytest.raises(OSError) as info:
        ckpt.save_checkpoint(folder, 2, model, [opt], {"tokens_seen": 32}, [ckpt.capture_rng()])
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC and "No space left on device" in str(info.value)
    assert "model.safetensors" in str(info.value)          # the error names the file
    assert ckpt.checkpoint_dirs(folder) == [first]          # no half-written step-2 is visible
    assert [p.name for p in folder.iterdir()] == [first.name], "temporaries left behind"

    fresh = build_model("transformer", cfg)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    state, rng = ckpt.load_checkpoint(ckpt.latest_checkpoint(folder), fresh, [fresh_opt])
    assert state["step"] == 1 and state["tokens_seen"] == 16
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert fresh_opt.state_dict()["state"], "optimizer state restored"


# ----------------------------------------------------------------------------- atomic swap
def test_kill_between_the_two_renames_of_atomic_dir_loses_nothing(tmp_path):
    """atomic_dir swaps folders with two renames (target -> .old, tmp -> target). A kill
    between them leaves the target absent; the next writer puts the previous version back
    before it starts, so even a failed rerun leaves the previous output in place."""
    from lmpipe.core.files import atomic_dir

    target = tmp_path / "corpus"
    with atomic_dir(target) as tmp:
        (tmp / "train.txt").write_text("previous\n")
    os.replace(target, tmp_path / ".corpus.old-4242")           # the state the kill left
    (tmp_path / ".corpus.abc.tmp").mkdir()                      # and its half-built successor
    (tmp_path / ".corpus.abc.tmp" / "train.txt").write_text("half")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "train.txt").write_text("new but failing\n")
            raise RuntimeError("the rerun fails too")
    assert (target / "train.txt").read_text() == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]
    with atomic_dir(target) as tmp:
        (tmp / "train.txt").write_text("new\n")
    assert (target / "train.txt").read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]

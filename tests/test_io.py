"""Atomic publication: a failed or killed write never replaces or corrupts the previous output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from lmpipe.core.files import (
    atomic_dir,
    atomic_path,
    md5_file,
    sha256_file,
    write_json_atomic,
)


def test_atomic_path_replaces_only_on_success(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]  # no temp file left behind
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"


def test_atomic_dir_swaps_whole_folders(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "a").write_text("old")
    with pytest.raises(ValueError):
        with atomic_dir(target) as tmp:
            (tmp / "a").write_text("half")
            raise ValueError("bad input")
    assert (target / "a").read_text() == "old"
    with atomic_dir(target) as tmp:
        (tmp / "b").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_sigkill_mid_write_leaves_previous_file(tmp_path):
    target = tmp_path / "big.bin"
    target.write_bytes(b"previous")
    code = (
        "import sys, time\n"
        "from lmpipe.core.files import atomic_path\n"
        f"with atomic_path({str(target)!r}) as tmp:\n"
        "    f = open(tmp, 'wb'); f.write(b'x' * 1000); f.flush()\n"
        "    print('writing', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert target.read_bytes() == b"previous"


def test_json_is_deterministic_and_hashes_match_hashlib(tmp_path):
    import hashlib

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    write_json_atomic(a, {"b": 1, "a": [1, 2]})
    write_json_atomic(b, {"a": [1, 2], "b": 1})
    assert a.read_bytes() == b.read_bytes()
    assert sha256_file(a) == hashlib.sha256(a.read_bytes()).hexdigest()
    assert md5_file(a) == hashlib.md5(a.read_bytes()).hexdigest()


def test_published_files_get_normal_permissions_and_stale_temps_are_cleared(tmp_path):
    stale = tmp_path / ".model.abc123.tmp"
    stale.mkdir()
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "w").write_text("x")
    with atomic_path(tmp_path / "f.txt") as tmp:
        tmp.write_text("y")
    assert not stale.exists()
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o777 & ~mask
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o666 & ~mask

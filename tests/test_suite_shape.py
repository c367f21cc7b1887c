"""The test suite's own shape: what `make test-fast` leaves out, and the `gpu` marker.

`make test` runs everything; `make test-fast` runs what is not marked `slow` (the inner loop).
Tests that need CUDA carry `gpu`: without a CUDA device they are deselected and named at the
end of the run, never counted among the passes (tests/conftest.py).
"""

from __future__ import annotations

import subprocess
import sys

import torch

from tests.conftest import REPO

HEAVY = ("tests/test_reproducible.py", "tests/test_reliability.py", "tests/test_bad_input.py",
         "tests/test_flow.py", "tests/test_dvc_pipeline.py", "tests/test_worker.py",
         "tests/test_remote.py", "tests/test_schedule.py")


def _collect(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                           "-p", "no:cacheprovider", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_make_test_fast_leaves_out_every_heavy_file_and_test_keeps_them():
    recipe = subprocess.run(["make", "-n", "test-fast"], cwd=REPO, capture_output=True,
                            text=True, timeout=60).stdout
    assert '-m pytest -q -m "not slow"' in recipe, recipe
    full = subprocess.run(["make", "-n", "test"], cwd=REPO, capture_output=True, text=True,
                          timeout=60).stdout
    assert "-m pytest -q\n" in full, full                  # the whole suite, unchanged
    fast = _collect("-m", "not slow")
    assert fast.returncode == 0, fast.stdout[-3000:] + fast.stderr[-3000:]
    files = {line.split("::")[0] for line in fast.stdout.splitlines() if "::" in line}
    assert files and not files & set(HEAVY), sorted(files & set(HEAVY))
    assert "tests/test_architecture.py" in files
    assert all((REPO / f).is_file() for f in HEAVY)       # `make test` still collects them


def test_gpu_tests_are_deselected_and_named_without_cuda():
    proc = _collect("tests/test_trainer.py")
    listed = "DESELECTED tests/test_trainer.py::test_precision_choice_on_cuda"
    if torch.cuda.is_available():
        assert "tests/test_trainer.py::test_precision_choice_on_cuda" in proc.stdout
        assert listed not in proc.stdout
    else:
        assert "tests/test_trainer.py::test_precision_choice_on_cuda" not in \
            proc.stdout.split("gpu test(s) deselected")[0]
        assert "1 gpu test(s) deselected: no CUDA device here" in proc.stdout
        assert listed in proc.stdout
        assert "1 deselected" in proc.stdout
        only_gpu = _collect("-m", "gpu", "tests/test_trainer.py")
        assert listed in only_gpu.stdout and only_gpu.returncode == 5   # nothing runs

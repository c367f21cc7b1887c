"""Shared test fixtures: an offline environment, the data mirror, a scratch project root; and
the `gpu` marker: tests that need CUDA are deselected where there is none (listed at the end of
the run, so they are never mistaken for passes), and run where there is (`-m gpu` alone)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Offline, quiet, reproducible: set before any library reads them.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _mirror() -> Path:
    env = os.environ.get("LMPIPE_MIRROR")
    return Path(env).resolve() if env else (REPO.parent / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def mirror() -> Path:
    """The offline mirror of the public data sets (../shared/data or LMPIPE_MIRROR)."""
    path = _mirror()
    if not (path / "tinyshakespeare.txt").exists():
        pytest.fail(f"offline mirror not found at {path}; set LMPIPE_MIRROR")
    return path


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory) -> str:
    """One SQLite MLflow store per test session (creating one costs seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def one_thread():
    """Tiny tensors gain nothing from threads, and on a shared machine threads cost a lot."""
    import torch  # deferred: most test modules never need it

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def project(tmp_path, monkeypatch, mlflow_uri, mirror) -> Path:
    """A scratch project root: stages write data/, metrics/ and plots/ under it."""
    monkeypatch.setenv("LMPIPE_ROOT", str(tmp_path))
    monkeypatch.setenv("LMPIPE_MIRROR", str(mirror))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    monkeypatch.chdir(tmp_path)
    return tmp_path


GPU_DESELECTED = pytest.StashKey[list]()


def pytest_collection_modifyitems(config, items):
    """No CUDA device: deselect the `gpu` tests (a skip would hide them among the passes'
    neighbours; deselected, they are counted apart and named in the summary)."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu:
        return
    import torch  # deferred: only when a gpu test was collected

    if torch.cuda.is_available():
        return
    config.hook.pytest_deselected(items=gpu)
    items[:] = [item for item in items if not item.get_closest_marker("gpu")]
    config.stash[GPU_DESELECTED] = [item.nodeid for item in gpu]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    ids = config.stash.get(GPU_DESELECTED, [])
    if ids:
        terminalreporter.section(f"{len(ids)} gpu test(s) deselected: no CUDA device here")
        for nodeid in ids:
            terminalreporter.line(f"DESELECTED {nodeid}")

"""`lmpipe sweep --local N`: the same sweep on this machine, with N local process workers.

Everything a sweep on many machines has, on one: a Prefect API (the one PREFECT_API_URL
names, else a server started here on 127.0.0.1 with its state in PREFECT_HOME, `.prefect/`
by default), a `process` work pool, and N `prefect worker start` processes, each with its own
workspace root (its TMPDIR, where the process worker makes one folder per flow run). The git
remote is the checkout itself (the experiments land in it, ready for `dvc exp show`); the
DVC remote is the checkout's default remote, else its own cache folder (a local remote and a
DVC cache share one layout, so what the workers push is at once in the cache `dvc exp
apply` reads). MLflow is the checkout's store (MLFLOW_TRACKING_URI or ./mlflow.db).

Workers and server are stopped at the end, the workers with every process under them (a
flow run runs in its own process group, which a plain signal to the worker would miss).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import psutil
from prefect import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL, temporary_settings

from lmpipe.core.console import note
from lmpipe.core.dvc_cli import run_dvc
from lmpipe.core.metric_logger import default_tracking_uri
from pipeline.remote import default_remote, remote_url

HEARTBEAT_S = "30"  # flow run heartbeats of the local workers (Prefect's default: 180)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prefect() -> str:
    beside = Path(sys.executable).with_name("prefect")
    return str(beside) if beside.exists() else "prefect"


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def stop_tree(proc: subprocess.Popen, grace_s: float = 15) -> None:
    """Stop `proc` and every process under it: TERM, then KILL after `grace_s`."""
    if proc.poll() is not None:
        return
    try:
        tree = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(tree, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait(10)


def _wait_healthy(api: str, server: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the Prefect server exited {server.returncode}; see {log}")
        with contextlib.suppress(Exception), urllib.request.urlopen(f"{api}/health", timeout=2):
            return
        time.sleep(0.5)
    raise RuntimeError(f"the Prefect server did not answer within {timeout_s:.0f} s; see {log}")


def local_dvc_remote(root: Path) -> str:
    """The DVC remote the local workers push to: the checkout's, else its cache folder."""
    url = remote_url()
    if url:
        return url
    name = default_remote(root)
    for line in run_dvc(root, "remote", "list").stdout.splitlines() if name else []:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == name:
            return parts[1]
    return run_dvc(root, "cache", "dir").stdout.strip()


def absolute_tracking_uri(root: Path) -> str:
    """The checkout's MLflow store, as a URI that means the same in a worker's folder."""
    uri = default_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str((Path.cwd() / uri[len("sqlite:///"):]).resolve())
    return uri


def worker_env(root: Path, api: str, workspace: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("LMPIPE_ROOT", None)  # each flow run works in its own clone
    env.pop("LMPIPE_PARENT_RUN_ID", None)
    env.update(PREFECT_API_URL=api, TMPDIR=str(workspace), MLFLOW_TRACKING_URI=
               absolute_tracking_uri(root), LMPIPE_DVC_REMOTE=local_dvc_remote(root),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    # the sweep's default --crash-after with --local (90 s) counts on this interval
    env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] = HEARTBEAT_S
    return env


@contextlib.contextmanager
def local_workers(root: Path, sweep: str, n: int, pool: str) -> Iterator[str]:
    """A Prefect API with `pool` and `n` process workers on it; yields the API URL."""
    logs = root / ".lmpipe" / "sweeps" / sweep
    procs: list[subprocess.Popen] = []
    api = PREFECT_API_URL.value()
    base = Path(tempfile.gettempdir()) / f"lmpipe-sweep-{sweep}"
    try:
        if not api:
            port = _free_port()
            api = f"http://127.0.0.1:{port}/api"
            env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false")
            env.setdefault("PREFECT_HOME", str(root / ".prefect"))
            log = logs / "prefect-server.log"
            server = _start([_prefect(), "server", "start", "--host", "127.0.0.1", "--port",
                             str(port)], env, log)
            procs.append(server)
            note(f"sweep {sweep}: starting a Prefect server at http://127.0.0.1:{port} "
                 f"(log: {log})")
            _wait_healthy(api, server, log, 180)
        with temporary_settings(updates={PREFECT_API_URL: api}):
            with get_client(sync_client=True) as client:
                try:
                    client.read_work_pool(pool)
                except ObjectNotFound:
                    client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            for i in range(1, n + 1):
                workspace = base / f"worker-{i}"
                workspace.mkdir(parents=True, exist_ok=True)
                procs.append(_start(
                    [_prefect(), "worker", "start", "--pool", pool, "--type", "process",
                     "--limit", "1", "--name", f"{sweep}-local-{i}"],
                    worker_env(root, api, workspace), logs / f"worker-{i}.log"))
            note(f"sweep {sweep}: {n} local worker(s) on pool {pool} (logs: {logs}, "
                 f"workspaces: {base})")
            yield api
    finally:
        for proc in reversed(procs):
            stop_tree(proc)
        shutil.rmtree(base, ignore_errors=True)  # what killed flow runs left behind

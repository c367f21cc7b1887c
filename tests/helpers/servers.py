"""Helpers for the orchestration tests: scratch git+DVC projects and local servers.

Kept in the package (like `prefect.testing`) so several test modules share them without a
conftest of their own. Nothing here runs in production code paths.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Iterator

import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update({
        "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1", "GIT_AUTHOR_NAME": "lmpipe test",
        "GIT_AUTHOR_EMAIL": "test@lmpipe.invalid", "GIT_COMMITTER_NAME": "lmpipe test",
        "GIT_COMMITTER_EMAIL": "test@lmpipe.invalid",
    })
    env.update(extra)
    return env


def sh(cmd: list[str] | str, cwd: Path, env: dict | None = None, check: bool = True,
       timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env or test_env(), capture_output=True, text=True,
                          timeout=timeout, shell=isinstance(cmd, str))
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{cmd} exited {proc.returncode} in {cwd}\n--- stdout\n{proc.stdout[-4000:]}"
            f"\n--- stderr\n{proc.stderr[-4000:]}"
        )
    return proc


def git_dvc_init(root: Path, commit: bool = True) -> None:
    env = test_env()
    sh(["git", "init", "-q", "-b", "main"], root, env)
    if not (root / ".dvc").exists():
        sh([str(BIN / "dvc"), "init", "-q"], root, env)
    sh([str(BIN / "dvc"), "config", "core.autostage", "false"], root, env)
    if commit:
        sh(["git", "add", "-A"], root, env)
        sh(["git", "commit", "-q", "-m", "scratch project"], root, env)


# ----------------------------------------------------------------------------- fake pipeline
FAKE_STAGE = textwrap.dedent('''\
    """A stand-in stage for orchestration tests: reads its deps, writes outs and metrics.

    control/<stage> (not a DVC dep) steers it: "fail CODE N" exits CODE on the first N
    attempts (attempts are counted in control/<stage>.attempts); "sleep S" sleeps first.
    """
    import json, os, sys, time, hashlib
    from pathlib import Path

    OUTS = {"pretrain": "data/models/transformer", "sft": "data/models/sft"}
    name = sys.argv[1]
    deps = sys.argv[2:]
    ctl = Path("control") / name
    attempts = Path("control") / f"{name}.attempts"
    attempts.parent.mkdir(exist_ok=True)
    n = int(attempts.read_text()) + 1 if attempts.exists() else 1
    attempts.write_text(str(n))
    with open(Path("control") / "order.log", "a") as f:
        f.write(f"{name} start {time.time():.3f}\\n")
    words = ctl.read_text().split() if ctl.exists() else []
    if words[:1] == ["sleep"]:
        time.sleep(float(words[1]))
    if words[:1] == ["fail"] and n <= int(words[2]):
        print(f"stage {name}: simulated failure {n}", file=sys.stderr)
        sys.exit(int(words[1]))
    h = hashlib.sha256(name.encode())
    for d in deps:
        p = Path(d)
        for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
            if f.is_file():
                h.update(f.read_bytes())
    out = Path(OUTS.get(name, f"data/{name}"))
    out.mkdir(parents=True, exist_ok=True)
    (out / ("model.safetensors" if "models" in out.parts else "model.bin")).write_bytes(
        h.digest() * 64)
    (out / "config.json").write_text(json.dumps({"stage": name}))
    Path("metrics").mkdir(exist_ok=True)
    value = int.from_bytes(h.digest()[:2], "big") / 65536 + 1
    metrics = {"val_bpb": value, "val_ppl": 2 ** value, "train_seconds": 0.01}
    if name == "evaluate":
        metrics = {m: {"test_bpb": value + i / 10, "test_ppl": 2 ** (value + i / 10)}
                   for i, m in enumerate(["ngram", "rnn", "transformer"])}
    Path("metrics", f"{name}.json").write_text(json.dumps(metrics))
    if os.environ.get("LMPIPE_TRACKING", "").lower() not in ("off", "0", "false", "none"):
        from lmpipe.core.metric_logger import stage_logger
        with stage_logger(name) as log:
            log.log_metrics({k: v for k, v in metrics.items() if isinstance(v, float)})
        with open(Path("control") / "runs.log", "a") as f:
            f.write(f"{name} {log.run_id}\\n")
    with open(Path("control") / "order.log", "a") as f:
        f.write(f"{name} end {time.time():.3f}\\n")
''')

# name -> upstream stages (a DAG like the real one: ngram and rnn independent of each other)
FAKE_GRAPH = {
    "download": [],
    "tokenizer": ["download"],
    "ngram": ["tokenizer"],
    "rnn": ["tokenizer"],
    "pretrain": ["tokenizer"],
    "evaluate": ["ngram", "rnn", "pretrain"],
}


FAKE_OUTS = {"pretrain": "data/models/transformer", "sft": "data/models/sft"}


def fake_out(name: str) -> str:
    return FAKE_OUTS.get(name, f"data/{name}")


def fake_dvc_yaml(graph: dict[str, list[str]] | None = None) -> dict:
    graph = graph or FAKE_GRAPH
    stages = {}
    for name, ups in graph.items():
        deps = ["fake_stage.py"] + [fake_out(u) for u in ups]
        stages[name] = {
            "cmd": f"python fake_stage.py {name} " + " ".join(fake_out(u) for u in ups),
            "deps": deps,
            "params": [f"fake.{name}"],
            "outs": [fake_out(name)],
            "metrics": [{f"metrics/{name}.json": {"cache": False}}],
        }
    return {"stages": stages}


def make_fake_project(root: Path, graph: dict[str, list[str]] | None = None) -> Path:
    """A git+DVC repo whose dvc.yaml runs `fake_stage.py` stages (seconds, not minutes)."""
    root.mkdir(parents=True, exist_ok=True)
    graph = graph or FAKE_GRAPH
    (root / "fake_stage.py").write_text(FAKE_STAGE)
    # the checkout's own flow package, as in a real clone (`lmpipe run` imports it from there)
    shutil.copytree(REPO / "pipeline", root / "pipeline",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (root / "dvc.yaml").write_text(yaml.safe_dump(fake_dvc_yaml(graph), sort_keys=False))
    params = {"fake": {n: 1 for n in graph}, "pipeline": {"retries": 2, "retry_delay_s": 0.0}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / ".gitignore").write_text("/control/\n/.lmpipe/\n/mlflow.db\n/mlartifacts/\n")
    git_dvc_init(root)
    return root


# ----------------------------------------------------------------------------- real project copy
def copy_project(dst: Path, profile: str = "smoke", src: Path = REPO) -> Path:
    """A scratch git+DVC copy of this project's tracked and not-ignored files, on `profile`."""
    listed = sh(["git", "ls-files", "-co", "--exclude-standard", "-z"], src).stdout
    dst.mkdir(parents=True, exist_ok=True)
    for rel in filter(None, listed.split("\0")):
        s = src / rel
        if not s.is_file():
            continue
        d = dst / rel
        d.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(s, d)
    if (src / ".dvc" / "config").exists() and not (dst / ".dvc").exists():
        (dst / ".dvc").mkdir()
        shutil.copy2(src / ".dvc" / "config", dst / ".dvc" / "config")
    env = test_env(LMPIPE_ROOT=str(dst))
    sh([str(BIN / "lmpipe"), "profile", profile], dst, env)
    git_dvc_init(dst)
    return dst


# ----------------------------------------------------------------------------- servers
@contextlib.contextmanager
def process(cmd: list[str], cwd: Path, env: dict, log: Path) -> Iterator[subprocess.Popen]:
    """A background process in its own session, stopped (TERM, then KILL) on exit."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen, grace: float = 15) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None,
              log: Path | None = None) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode} before answering {url}:\n"
                                 + (log.read_text()[-3000:] if log else ""))
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except Exception:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout:.0f} s"
                         + (f":\n{log.read_text()[-3000:]}" if log else ""))


def find_pg_bin() -> Path:
    """The folder holding Debian's initdb/pg_ctl (they are not on PATH by default)."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    for cand in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (cand / "initdb").exists():
            return cand
    raise AssertionError(
        "PostgreSQL server binaries not found (initdb, pg_ctl). Install them with "
        "`apt-get update && apt-get install -y postgresql` (Debian), then re-run."
    )


@contextlib.contextmanager
def postgres_cluster(base: Path) -> Iterator[str]:
    """A throwaway PostgreSQL cluster on 127.0.0.1:<free port>; yields a SQLAlchemy URL.

    initdb refuses to run as root, so as root the cluster belongs to the `postgres` user
    (created by Debian's package), lives in a fresh folder under the system temp dir (pytest's
    own folders are closed to other users) and every command runs through `runuser`.
    """
    import tempfile

    pg = find_pg_bin()
    port = free_port()
    as_user: list[str] = []
    owned = None
    if os.geteuid() == 0:
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            raise AssertionError("running as root and there is no `postgres` user to own the "
                                 "test cluster: `apt-get install -y postgresql` creates it")
        owned = Path(tempfile.mkdtemp(prefix="lmpipe-pg-"))
        shutil.chown(owned, "postgres", "postgres")
        base = owned
        as_user = ["runuser", "-u", "postgres", "--"]
    base.mkdir(parents=True, exist_ok=True)
    data = base / "pgdata"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C.UTF-8"
    pwfile = base / "pw"
    pwfile.write_text("lmpipe\n")
    if as_user:
        shutil.chown(pwfile, "postgres", "postgres")

    def run(cmd: list[str], timeout: float) -> None:
        proc = subprocess.run(as_user + cmd, capture_output=True, text=True, env=env, cwd=base,
                              timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}"
                                 f"\n{proc.stderr}")

    run([str(pg / "initdb"), "-D", str(data), "-U", "lmpipe", "-A", "scram-sha-256",
         f"--pwfile={pwfile}", "-E", "UTF8"], 120)
    log = base / "pg.log"
    run([str(pg / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
         f"-h 127.0.0.1 -p {port} -k {base} -c fsync=off", "start"], 90)
    try:
        proc = subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "lmpipe", "-d",
                               "postgres", "-c", "CREATE DATABASE mlflow"], capture_output=True,
                              text=True, env={**env, "PGPASSWORD": "lmpipe"}, timeout=30)
        if proc.returncode != 0:
            raise AssertionError(f"CREATE DATABASE failed: {proc.stderr}")
        yield f"postgresql+psycopg2://lmpipe:lmpipe@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run(as_user + [str(pg / "pg_ctl"), "-D", str(data), "-m", "immediate",
                                  "stop"], capture_output=True, env=env, cwd=base, timeout=60)
        if owned is not None:
            shutil.rmtree(owned, ignore_errors=True)


# ----------------------------------------------------------------------------- prefect harness
_HARNESS = None


def shared_prefect_harness(timeout: int = 120) -> None:
    """One `prefect_test_harness` for the whole test session, whichever module asks first.

    Starting its server costs 10-25 s here. Session-scoped fixtures call this and register
    `close_shared_prefect_harness` as their finalizer (idempotent).
    """
    global _HARNESS
    if _HARNESS is not None:
        return
    from prefect.testing.utilities import prefect_test_harness

    cm = prefect_test_harness(server_startup_timeout=timeout)
    cm.__enter__()
    _HARNESS = cm


def close_shared_prefect_harness() -> None:
    global _HARNESS
    if _HARNESS is not None:
        cm, _HARNESS = _HARNESS, None
        cm.__exit__(None, None, None)


# ----------------------------------------------------------------------------- deployed run
def real_pipeline_has_stages(src: Path = REPO) -> bool:
    path = src / "dvc.yaml"
    if not path.exists():
        return False
    return bool((yaml.safe_load(path.read_text()) or {}).get("stages"))


_SMOKE: dict | None = None


def api_get(api: str, path: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"{api}{path}", timeout=30) as r:
        return __import__("json").loads(r.read())


def deployed_smoke_run(base: Path, mirror: Path, deployment: str = "lmpipe-pipeline/pipeline",
                       timeout_s: float = 900) -> dict:
    """The real thing, once per test session: `prefect server start` on 127.0.0.1, a
    `process` work pool, `prefect deploy --all` from a scratch copy of the project on the
    smoke profile, a triggered run of `deployment`, and `prefect worker start --run-once`
    picking it up. Returns what the tests check (root, flow run, MLflow store, logs).

    Every setting the run needs (the offline mirror included) goes into the environment of
    its own processes; the test session's environment is left as it was.
    """
    global _SMOKE
    if _SMOKE is not None:
        return _SMOKE
    base.mkdir(parents=True, exist_ok=True)
    if not real_pipeline_has_stages():
        raise AssertionError(f"{REPO / 'dvc.yaml'} defines no stages to deploy")
    root = copy_project(base / "project", "smoke")
    kind = "real"
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    mlflow_uri = f"sqlite:///{root / 'mlflow.db'}"
    home = base / "prefect-home"
    home.mkdir(exist_ok=True)
    env = test_env(
        PREFECT_HOME=str(home), PREFECT_API_URL=api, PREFECT_SERVER_UI_ENABLED="false",
        PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_API_HOST="127.0.0.1",
        PREFECT_SERVER_API_PORT=str(port), MLFLOW_TRACKING_URI=mlflow_uri,
        LMPIPE_ROOT=str(root), LMPIPE_MIRROR=str(mirror), PREFECT_LOGGING_LEVEL="INFO",
    )
    env.pop("LMPIPE_PARENT_RUN_ID", None)
    env.pop("LMPIPE_TRACKING", None)
    prefect = str(BIN / "prefect")
    server_log, worker_log = base / "server.log", base / "worker.log"
    with process([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port),
                  "--no-ui"], base, env, server_log) as server:
        wait_http(f"{api}/health", 180, server, server_log)
        sh([prefect, "work-pool", "create", "gpu", "--type", "process"], root, env)
        deploy = sh([prefect, "--no-prompt", "deploy", "--all"], root, env)
        trig = sh([prefect, "deployment", "run", deployment], root, env)
        import re

        flow_run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", trig.stdout).group(1)
        t0 = time.monotonic()
        with process([prefect, "worker", "start", "--pool", "gpu", "--type", "process",
                      "--run-once", "--limit", "1"], root, env, worker_log) as worker:
            deadline = time.monotonic() + timeout_s
            state = None
            while time.monotonic() < deadline:
                state = api_get(api, f"/flow_runs/{flow_run_id}")["state"]
                if state and state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                    break
                if worker.poll() is not None and (state or {}).get("type") in (
                        "SCHEDULED", "PENDING", None):
                    break
                time.sleep(2)
            worker.wait(60) if worker.poll() is None else None
        seconds = time.monotonic() - t0
        flow_run = api_get(api, f"/flow_runs/{flow_run_id}")
        deployments = {d["name"]: d for d in _post(api, "/deployments/filter", {})}
    _SMOKE = {
        "kind": kind, "root": root, "mlflow_uri": mlflow_uri, "flow_run": flow_run,
        "state": flow_run["state"]["type"], "seconds": seconds, "deploy_stdout": deploy.stdout,
        "deployments": deployments, "server_log": server_log, "worker_log": worker_log,
        "env": env,
    }
    return _SMOKE


def _post(api: str, path: str, body: dict) -> list:
    import json
    import urllib.request

    req = urllib.request.Request(f"{api}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


# ----------------------------------------------------------------------------- sweep servers
@contextlib.contextmanager
def moto_s3(bucket: str = "lmpipe") -> Iterator[dict]:
    """moto's S3 server on 127.0.0.1 with one bucket; yields endpoint, client and the env."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
             "AWS_DEFAULT_REGION": "us-east-1"}
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket=bucket)
    try:
        yield {"endpoint": endpoint, "client": client, "env": creds, "bucket": bucket}
    finally:
        server.stop()


def s3_keys(client, bucket: str, prefix: str) -> list[str]:
    out = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", [])]
    return out


@contextlib.contextmanager
def mlflow_server(base: Path, backend_uri: str, artifacts: str, env: dict) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 (one web worker, no job runner); yields its URL."""
    port = free_port()
    env = {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = base / "mlflow-server.log"
    with process([str(BIN / "mlflow"), "server", "--backend-store-uri", backend_uri,
                  "--artifacts-destination", artifacts, "--host", "127.0.0.1", "--port",
                  str(port), "--workers", "1"], base, env, log) as server:
        wait_http(f"http://127.0.0.1:{port}/health", 240, server, log)
        yield f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def prefect_server(base: Path, env: dict) -> Iterator[str]:
    """`prefect server start` on 127.0.0.1 (no UI), state under base; yields the API URL."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    home = base / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    env = {**env, "PREFECT_HOME": str(home), "PREFECT_SERVER_UI_ENABLED": "false",
           "PREFECT_API_URL": api}
    log = base / "prefect-server.log"
    with process([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                  str(port), "--no-ui"], base, env, log) as server:
        wait_http(f"{api}/health", 240, server, log)
        yield api


def kill_tree(pid: int) -> list[int]:
    """SIGKILL a process and everything under it at once (a machine that dies); the pids."""
    import psutil

    try:
        root = psutil.Process(pid)
        tree = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return []
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(tree, timeout=10)
    return [p.pid for p in tree]

"""`lmpipe sweep` for real, on loopback: the services a team shares, two workers, one killed.

- git remote: a bare repository; DVC remote: moto's S3 server; MLflow: `mlflow server` on a
  throwaway PostgreSQL cluster with its artifacts in the same S3; Prefect: `prefect server
  start`, a `process` work pool, two `prefect worker start` processes, each with its own
  workspace root (TMPDIR) and heartbeat (PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30), the way the
  README starts a worker on each machine.
- The scratch project is this repository on the smoke profile (training cut to 12 steps),
  committed and pushed. The sweep is the README's: pretrain.train.lr x pretrain.model.n_layer,
  4 points, each running pretrain, sft, lora and evaluate.
- Worker 1 is killed (SIGKILL, with every process under it, as a machine that dies) while it
  trains a point. The point's flow run must be retried on worker 2 and the sweep complete.

Checked afterwards: a fresh clone sees the 4 experiments after `dvc exp pull` and can apply
the best one with its outs from S3; MLflow holds the 4 points under the sweep run; download
and tokenizer ran once (in the base); the report's PNG is in the sweep's run.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import yaml

from lmpipe.core.profiles import deep_merge, dump_params
from tests.helpers import servers as T

pytestmark = pytest.mark.slow

GRID = ["-S", "pretrain.train.lr=0.003,0.006", "-S", "pretrain.model.n_layer=1,2"]
_STEPS = {"max_steps": 12, "eval_every": 6, "checkpoint_every": 6, "warmup_steps": 2,
          "log_every": 3, "progress": False}
FEWER_STEPS = {"rnn": {"train": _STEPS}, "pretrain": {"train": _STEPS},
               "sft": {"epochs": None, "train": {**_STEPS, "max_tokens": None}},
               "lora": {"epochs": None, "train": {**_STEPS, "max_tokens": None}},
               "evaluate": {"max_tokens": 1024}}
POINT_STAGES = ("stages.pretrain", "stages.sft", "stages.lora", "stages.evaluate")


def _running_point_stage(pid: int) -> bool:
    try:
        procs = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return False
    for p in procs:
        try:
            if any(s in " ".join(p.cmdline()) for s in POINT_STAGES):
                return True
        except psutil.Error:
            continue
    return False


def _worker(base: Path, name: str, env: dict) -> subprocess.Popen:
    root = base / name
    root.mkdir()
    wenv = {**env, "TMPDIR": str(root), "PREFECT_HOME": str(base / f"{name}-home"),
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}
    with open(base / f"{name}.log", "wb") as log:
        return subprocess.Popen([str(T.BIN / "prefect"), "worker", "start", "--pool", "sweep",
                                 "--type", "process", "--limit", "1", "--name", name],
                                cwd=base, env=wenv, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


@pytest.fixture(scope="module")
def swept(tmp_path_factory, mirror):
    """Everything above, the sweep run to the end; yields what the tests check."""
    base = tmp_path_factory.mktemp("sweep-remote")
    bare = base / "remote.git"
    T.sh(["git", "init", "-q", "--bare", "-b", "main", str(bare)], base)
    project = T.copy_project(base / "project", "smoke")
    # the smoke profile with fewer training steps (as tests/test_reproducible.py): the sweep's
    # machinery is under test here, not the models
    params = deep_merge(yaml.safe_load((project / "params.yaml").read_text()), FEWER_STEPS)
    (project / "params.yaml").write_text(dump_params(params))
    T.sh(["git", "commit", "-qam", "fewer training steps"], project)
    T.sh(["git", "remote", "add", "origin", str(bare)], project)
    T.sh(["git", "push", "-q", "origin", "main"], project)
    clean = {k: v for k, v in T.test_env().items()
             if not k.startswith(("LMPIPE_", "MLFLOW_", "PREFECT_"))}
    with T.moto_s3() as s3, T.postgres_cluster(base / "pg") as pg:
        server_env = {**clean, **s3["env"], "MLFLOW_S3_ENDPOINT_URL": s3["endpoint"]}
        with T.mlflow_server(base, pg, "s3://lmpipe/mlflow", server_env) as mlflow_url, \
                T.prefect_server(base, clean) as api:
            env = {**clean, **s3["env"], "PREFECT_API_URL": api, "LMPIPE_MIRROR": str(mirror),
                   "MLFLOW_TRACKING_URI": mlflow_url, "LMPIPE_DVC_REMOTE": "s3://lmpipe/dvc",
                   "LMPIPE_S3_ENDPOINT_URL": s3["endpoint"],
                   "PREFECT_HOME": str(base / "driver-home")}
            T.sh([str(T.BIN / "prefect"), "work-pool", "create", "sweep", "--type", "process"],
                 base, env)
            workers = {n: _worker(base, n, env) for n in ("w1", "w2")}
            started = time.monotonic()
            with open(base / "sweep.log", "wb") as log:
                driver = subprocess.Popen(
                    [str(T.BIN / "lmpipe"), "sweep", *GRID, "--name", "smoke", "--pool", "sweep",
                     "--crash-after", "90"], cwd=project, env=env, stdout=log,
                    stderr=subprocess.STDOUT)
            killed_at = None
            while driver.poll() is None and time.monotonic() - started < 1500:
                if killed_at is None and _running_point_stage(workers["w1"].pid):
                    time.sleep(2)
                    T.kill_tree(workers["w1"].pid)
                    killed_at = time.monotonic() - started
                time.sleep(1)
            if driver.poll() is None:
                driver.kill()
            seconds = time.monotonic() - started
            for w in workers.values():
                T.stop(w)
            flow_runs = T._post(api, "/flow_runs/filter", {})
            yield {"base": base, "project": project, "bare": bare, "s3": s3, "env": env,
                   "mlflow": mlflow_url, "code": driver.returncode, "killed_at": killed_at,
                   "seconds": seconds, "flow_runs": flow_runs,
                   "log": (base / "sweep.log").read_text(errors="replace")}


def _why(swept) -> str:
    tail = lambda p: p.read_text(errors="replace")[-3000:] if p.exists() else ""  # noqa: E731
    return (f"--- sweep (exit {swept['code']})\n{swept['log'][-5000:]}\n--- w1\n"
            f"{tail(swept['base'] / 'w1.log')}\n--- w2\n{tail(swept['base'] / 'w2.log')}")


def test_the_sweep_completes_after_a_worker_dies(swept):
    print(f"sweep wall time {swept['seconds']:.0f} s; worker 1 killed at "
          f"{swept['killed_at']} s")
    assert swept["killed_at"] is not None, "worker 1 never ran a point: " + _why(swept)
    assert swept["code"] == 0, _why(swept)
    points = {r["name"]: r for r in swept["flow_runs"] if r["name"].startswith("smoke-")}
    assert sorted(points) == ["smoke-1", "smoke-2", "smoke-3", "smoke-4", "smoke-base"]
    assert {r["state"]["type"] for r in points.values()} == {"COMPLETED"}
    # the point worker 1 was running ran again, to completion, on worker 2
    retried = [r for r in points.values() if r["run_count"] > 1]
    assert len(retried) == 1, [(r["name"], r["run_count"]) for r in points.values()]
    w2_log = (swept["base"] / "w2.log").read_text(errors="replace")
    assert retried[0]["id"] in w2_log
    assert "rescheduled, attempt 2" in swept["log"]


def test_a_fresh_clone_pulls_the_four_experiments_and_applies_the_best(swept, tmp_path):
    env = {**swept["env"], "LMPIPE_ROOT": str(tmp_path / "clone")}
    clone = tmp_path / "clone"
    T.sh(["git", "clone", "-q", str(swept["bare"]), str(clone)], tmp_path, env)
    T.sh([str(T.BIN / "dvc"), "remote", "add", "--local", "-d", "s3", "s3://lmpipe/dvc"],
         clone, env)
    T.sh([str(T.BIN / "dvc"), "remote", "modify", "--local", "s3", "endpointurl",
          swept["s3"]["endpoint"]], clone, env)
    T.sh([str(T.BIN / "dvc"), "exp", "pull", "origin"], clone, env)
    shown = json.loads(T.sh([str(T.BIN / "dvc"), "exp", "show", "--json"], clone, env).stdout)
    exps = {e["name"]: e for base in shown for e in (base.get("experiments") or [])
            if e.get("name")}
    assert set(exps) == {"smoke-1", "smoke-2", "smoke-3", "smoke-4", "smoke-base"}
    grid = set()
    for name in ("smoke-1", "smoke-2", "smoke-3", "smoke-4"):
        params = exps[name]["revs"][0]["data"]["params"]["params.yaml"]["data"]["pretrain"]
        grid.add((params["train"]["lr"], params["model"]["n_layer"]))
    assert grid == {(0.003, 1), (0.003, 2), (0.006, 1), (0.006, 2)}

    report = T.sh([str(T.BIN / "lmpipe"), "sweep", "report", "smoke"], clone, env).stdout
    lines = report.splitlines()
    col = [c.strip() for c in lines[2].split("|")].index("transformer test_bpb")
    rows = [line.split("|") for line in lines if line.startswith("| smoke-")]
    bpb = [float(r[col]) for r in rows]
    assert len(rows) == 4 and bpb == sorted(bpb), report
    best = rows[0][1].strip()

    T.sh([str(T.BIN / "lmpipe"), "sweep", "apply", "smoke"], clone, env)
    params = yaml.safe_load((clone / "params.yaml").read_text())["pretrain"]
    want = exps[best]["revs"][0]["data"]["params"]["params.yaml"]["data"]["pretrain"]
    assert (params["train"]["lr"], params["model"]["n_layer"]) == \
        (want["train"]["lr"], want["model"]["n_layer"])
    lock = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]["pretrain"]
    out = next(o for o in lock["outs"] if o["path"] == "data/models/transformer")
    status = T.sh([str(T.BIN / "dvc"), "data", "status", "--json"], clone, env).stdout
    assert (clone / "data/models/transformer/model.safetensors").exists(), status
    assert out["md5"].endswith(".dir")


def test_mlflow_holds_the_points_under_the_sweep_and_shared_stages_ran_once(swept):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(swept["mlflow"])
    exp = client.get_experiment_by_name("lmpipe")
    sweep = client.search_runs([exp.experiment_id], "tags.`lmpipe.sweep_role` = 'sweep'")
    assert [r.data.tags["lmpipe.sweep"] for r in sweep] == ["smoke"]
    parent = sweep[0]
    assert parent.info.status == "FINISHED"
    children = client.search_runs([exp.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    roles = sorted((c.data.tags["lmpipe.sweep_role"], c.info.run_name) for c in children)
    assert roles == [("base", "smoke-base")] + [("point", f"smoke-{i}") for i in range(1, 5)]
    stage_runs = {}
    for c in children:
        assert c.info.status == "FINISHED", (c.info.run_name, c.data.tags.get("lmpipe.error"))
        for s in client.search_runs([exp.experiment_id],
                                    f"tags.`mlflow.parentRunId` = '{c.info.run_id}'"):
            if s.info.status == "FINISHED":
                stage_runs.setdefault(s.data.tags["dvc_stage"], []).append(c.info.run_name)
        if c.data.tags["lmpipe.sweep_role"] == "point":
            assert "evaluate.transformer.test_bpb" in c.data.metrics
            assert c.data.params["pretrain.train.lr"] in ("0.003", "0.006")
    # download and tokenizer ran once, in the base; every point trained its own Transformer
    assert stage_runs["download"] == ["smoke-base"]
    assert stage_runs["tokenizer"] == ["smoke-base"]
    assert sorted(stage_runs["pretrain"]) == [f"smoke-{i}" for i in range(1, 5)]
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert {"sweep/report.png", "sweep/report.md"} <= arts
    keys = T.s3_keys(swept["s3"]["client"], "lmpipe", "mlflow/")
    assert any(k.endswith("sweep/report.png") for k in keys)
    assert T.s3_keys(swept["s3"]["client"], "lmpipe", "dvc/files/md5/")
    assert T.s3_keys(swept["s3"]["client"], "lmpipe", "dvc/runs/")  # the run cache

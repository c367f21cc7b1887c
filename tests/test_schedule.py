"""The nightly retraining deployment, seen to fire: a schedule creates a run, a worker runs it.

prefect.yaml's `nightly-retrain` deployment is deployed as it is written (entrypoint, work
pool, parameters, concurrency limit) with one change: its nightly cron becomes a 30-second
interval, so that the server's scheduler creates a run within the test. A `process` worker
on the `gpu` pool picks it up and runs pipeline/retrain.py on stand-in stages (a scratch
git+DVC project, seconds per stage), and the run must complete, promotion included.
"""

from __future__ import annotations

import re
import time

import pytest
import yaml

from tests.helpers import servers as T

pytestmark = pytest.mark.slow

INTERVAL_S = 30


def _nightly(spec: dict) -> dict:
    return next(d for d in spec["deployments"] if d["name"] == "nightly-retrain")


def test_prefect_yaml_nightly_deployment():
    """What the schedule test deploys, as committed: the nightly cron, one run at a time, and
    a 2 h wait for the checkout lock behind a run started by hand."""
    nightly = _nightly(yaml.safe_load((T.REPO / "prefect.yaml").read_text()))
    assert [s["cron"] for s in nightly["schedules"]] == ["0 2 * * *"]
    assert nightly["schedules"][0]["timezone"] == "UTC" and nightly["schedules"][0]["active"]
    assert nightly["concurrency_limit"] == 1
    assert nightly["parameters"] == {"lock_wait_s": 7200}
    assert nightly["entrypoint"] == "pipeline/retrain.py:lmpipe_retrain"


@pytest.mark.timeout(900)
def test_a_scheduled_retraining_run_fires_and_completes(tmp_path):
    root = T.make_fake_project(tmp_path / "proj", {"download": [], "pretrain": ["download"]})
    spec = yaml.safe_load((T.REPO / "prefect.yaml").read_text())
    _nightly(spec)["schedules"] = [{"interval": INTERVAL_S, "active": True}]
    spec["deployments"] = [_nightly(spec)]
    (root / "prefect.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    T.sh(["git", "add", "-A"], root)
    T.sh(["git", "commit", "-q", "-m", "prefect.yaml"], root)

    port = T.free_port()
    api = f"http://127.0.0.1:{port}/api"
    home = tmp_path / "prefect-home"
    home.mkdir()
    mlflow_uri = f"sqlite:///{root / 'mlflow.db'}"
    env = T.test_env(
        PREFECT_HOME=str(home), PREFECT_API_URL=api, PREFECT_SERVER_UI_ENABLED="false",
        PREFECT_SERVER_API_HOST="127.0.0.1", PREFECT_SERVER_API_PORT=str(port),
        # the scheduler and the worker look every few seconds instead of every minute
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5",
        PREFECT_WORKER_QUERY_SECONDS="3", PREFECT_WORKER_PREFETCH_SECONDS="5",
        MLFLOW_TRACKING_URI=mlflow_uri, LMPIPE_ROOT=str(root), LMPIPE_TRACKING="on",
        PREFECT_LOGGING_LEVEL="INFO")
    env.pop("LMPIPE_PARENT_RUN_ID", None)
    prefect = str(T.BIN / "prefect")
    server_log, worker_log = tmp_path / "server.log", tmp_path / "worker.log"

    with T.process([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port),
                    "--no-ui"], tmp_path, env, server_log) as server:
        T.wait_http(f"{api}/health", 180, server, server_log)
        T.sh([prefect, "work-pool", "create", "gpu", "--type", "process"], root, env)
        T.sh([prefect, "--no-prompt", "deploy", "--all"], root, env, timeout=180)
        (dep,) = T._post(api, "/deployments/filter", {})
        assert dep["name"] == "nightly-retrain" and dep["work_pool_name"] == "gpu"
        assert dep["parameters"] == {"lock_wait_s": 7200}
        assert dep["concurrency_limit"] == 1 or (
            dep.get("global_concurrency_limit") or {}).get("limit") == 1
        assert [s["schedule"]["interval"] for s in dep["schedules"]] == [INTERVAL_S]

        t0 = time.monotonic()
        done = None
        with T.process([prefect, "worker", "start", "--pool", "gpu", "--type", "process",
                        "--limit", "1"], root, env, worker_log) as worker:
            while time.monotonic() - t0 < 600 and worker.poll() is None:
                runs = T._post(api, "/flow_runs/filter", {
                    "flow_runs": {"deployment_id": {"any_": [dep["id"]]}}})
                finished = [r for r in runs if r["state_type"] in
                            ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")]
                if finished:
                    done = finished[0]
                    break
                time.sleep(3)
        seconds = time.monotonic() - t0
    tail = f"--- worker log\n{worker_log.read_text(errors='replace')[-5000:]}"
    assert done is not None, f"no scheduled run finished within {seconds:.0f} s\n{tail}"
    assert done["state_type"] == "COMPLETED", f"{done['state_name']}\n{tail}"
    assert done["auto_scheduled"] is True           # made by the schedule, not by hand
    assert done["parameters"] == {"lock_wait_s": 7200}
    print(f"scheduled run {done['name']} completed {seconds:.0f} s after the worker started")

    # It was the retraining flow, all of it: DVC ran the stages, promotion registered the model.
    from mlflow.tracking import MlflowClient

    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert set(lock) == {"download", "pretrain"}
    champ = MlflowClient(mlflow_uri).get_model_version_by_alias("lmpipe-transformer", "champion")
    assert champ.tags["lmpipe_model"] == "transformer"
    assert re.fullmatch(r"[0-9a-f]{32}", champ.run_id)

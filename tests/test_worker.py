"""End to end on this machine: a real Prefect server, a `process` work pool, `prefect deploy`
from prefect.yaml, and a worker that picks up one flow run of the smoke profile.

The scratch project is a git+DVC copy of this repository on the smoke profile with whatever
stages dvc.yaml has. The run is shared with tests/test_lineage.py and tests/test_remote.py
(pipeline.testing.deployed_smoke_run runs it once per session).
"""

from __future__ import annotations

import pytest
import yaml

from tests.helpers import servers as T

# The session's deployed smoke run (a Prefect server, the real stages) is set up by the
# first test that asks for it: that test carries its time.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(scope="session")
def smoke(tmp_path_factory, mirror):
    return T.deployed_smoke_run(tmp_path_factory.mktemp("smoke"), mirror)


def _why(smoke) -> str:
    tail = lambda p: p.read_text(errors="replace")[-6000:] if p.exists() else ""  # noqa: E731
    return (f"flow run state {smoke['state']}: {smoke['flow_run']['state'].get('message')}\n"
            f"--- worker log\n{tail(smoke['worker_log'])}\n--- server log\n"
            f"{tail(smoke['server_log'])[-1500:]}")


def test_worker_completes_a_deployed_flow_run(smoke):
    deps = smoke["deployments"]
    assert set(deps) >= {"pipeline", "nightly-retrain"}
    nightly = deps["nightly-retrain"]
    assert nightly["work_pool_name"] == "gpu"
    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 2 * * *"]
    assert nightly["concurrency_limit"] == 1 or (
        nightly.get("global_concurrency_limit") or {}).get("limit") == 1
    assert nightly["job_variables"]["env"]["DVC_NO_ANALYTICS"] == "1"
    # prefect deploy recorded the checkout as the flow runs' working directory
    step = deps["pipeline"]["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]
    assert step["directory"] == str(smoke["root"])
    assert smoke["state"] == "COMPLETED", _why(smoke)


def test_mlflow_holds_the_parent_and_a_child_per_stage(smoke):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(smoke["mlflow_uri"])
    exp = client.get_experiment_by_name("lmpipe")
    flow_run_id = smoke["flow_run"]["id"]
    parents = client.search_runs([exp.experiment_id],
                                 f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    assert len(parents) == 1
    parent = parents[0]
    completed = smoke["state"] == "COMPLETED"
    assert parent.info.status == ("FINISHED" if completed else "FAILED")
    assert parent.data.tags["lmpipe.kind"] == "pipeline"
    assert len(parent.data.tags["git_commit"]) == 40
    children = client.search_runs([exp.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    ran = {c.data.tags.get("dvc_stage") for c in children}
    done = set(yaml.safe_load((smoke["root"] / "dvc.lock").read_text())["stages"])
    assert done and done <= ran  # every stage recorded in dvc.lock ran as a child run
    for c in children:
        assert c.info.status == ("FINISHED" if c.data.tags["dvc_stage"] in done else "FAILED")
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "dvc.lock" in arts and "metrics" in arts
    stages = set((yaml.safe_load((smoke["root"] / "dvc.yaml").read_text()) or {})["stages"])
    assert ran == stages or not completed
    assert completed, _why(smoke)


def test_prefect_yaml_defaults():
    spec = yaml.safe_load((T.REPO / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in spec["deployments"]}
    assert by_name["nightly-retrain"]["entrypoint"] == "pipeline/retrain.py:lmpipe_retrain"
    assert by_name["pipeline"]["entrypoint"] == "pipeline/flow.py:lmpipe_pipeline"
    for d in by_name.values():
        assert d["work_pool"]["name"] == "gpu"
        assert d["concurrency_limit"] == 1
    assert "pull" not in spec  # prefect deploy records the checkout it ran from

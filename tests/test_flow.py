"""The Prefect flow's logic, in-process under one `prefect_test_harness`.

The stages here are stand-ins (tests/helpers/servers.py FAKE_STAGE) in a scratch git+DVC repo:
each takes a second or two, so retries, upstream selection, failure isolation, locking and
the task runners are tested without training anything.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from lmpipe.core.errors import InputError
from pipeline.graph import parse_dot, read_stage_graph
from tests.helpers import servers as T

# Heavy: real stages, DVC repos or a Prefect server (`make test-fast` leaves them out).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def prefect_api(request):
    T.shared_prefect_harness(120)
    request.addfinalizer(T.close_shared_prefect_harness)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A scratch project; tracking off (the MLflow test turns it on)."""
    monkeypatch.setenv("LMPIPE_TRACKING", "off")
    monkeypatch.delenv("LMPIPE_PARENT_RUN_ID", raising=False)

    def make(graph=None, control: dict[str, str] | None = None, pipeline: dict | None = None):
        root = T.make_fake_project(tmp_path / "proj", graph)
        if pipeline:
            params = yaml.safe_load((root / "params.yaml").read_text())
            params["pipeline"].update(pipeline)
            (root / "params.yaml").write_text(yaml.safe_dump(params))
        (root / "control").mkdir(exist_ok=True)
        for stage, text in (control or {}).items():
            (root / "control" / stage).write_text(text)
        monkeypatch.setenv("LMPIPE_ROOT", str(root))
        monkeypatch.chdir(root)
        return root

    return make


def attempts(root: Path, stage: str) -> int:
    f = root / "control" / f"{stage}.attempts"
    return int(f.read_text()) if f.exists() else 0


def started(root: Path) -> list[str]:
    log = root / "control" / "order.log"
    if not log.exists():
        return []
    return [ln.split()[0] for ln in log.read_text().splitlines() if ln.split()[1] == "start"]


# ----------------------------------------------------------------------------- the graph
DOT = textwrap.dedent("""\
    strict digraph {
    "download";
    "tokenizer";
    "ngram";
    "rnn";
    "pretrain";
    "evaluate";
    "data/raw.dvc";
    "download" -> "tokenizer";
    "tokenizer" -> "ngram";
    "tokenizer" -> "rnn";
    "tokenizer" -> "pretrain";
    "ngram" -> "evaluate";
    "rnn" -> "evaluate";
    "pretrain" -> "evaluate";
    "data/raw.dvc" -> "download";
    }
""")


def test_subset_selection_includes_upstream_in_order():
    g = parse_dot(DOT, {"download", "tokenizer", "ngram", "rnn", "pretrain", "evaluate"})
    assert "data/raw.dvc" not in g.upstream
    assert g.resolve(["rnn"]) == ["download", "tokenizer", "rnn"]
    assert g.resolve(["pretrain", "evaluate"]) == [
        "download", "tokenizer", "ngram", "rnn", "pretrain", "evaluate"]
    assert g.resolve(None) == g.stages
    assert g.levels(g.stages) == [["download"], ["tokenizer"], ["ngram", "rnn", "pretrain"],
                                  ["evaluate"]]
    with pytest.raises(InputError, match="unknown stage.*'sft'.*dvc.yaml has download"):
        g.resolve(["sft"])


def test_only_the_stages_dvc_yaml_has(tmp_path):
    """A partial pipeline (as while stages are being added) is read as it is."""
    root = T.make_fake_project(tmp_path / "p", {"download": [], "tokenizer": ["download"]})
    g = read_stage_graph(root)
    assert g.stages == ["download", "tokenizer"]
    assert g.resolve(["tokenizer"]) == ["download", "tokenizer"]
    assert read_stage_graph(tmp_path).stages == []  # no dvc.yaml: nothing to run


# ----------------------------------------------------------------------------- flow runs
def test_subset_runs_upstream_and_dvc_decides_staleness(prefect_api, fake):
    from pipeline.flow import lmpipe_pipeline

    root = fake({"download": [], "tokenizer": ["download"], "ngram": ["tokenizer"],
                 "rnn": ["tokenizer"]})
    report = lmpipe_pipeline(stages=["rnn"], root=str(root))
    assert report["planned"] == ["download", "tokenizer", "rnn"]
    assert started(root) == ["download", "tokenizer", "rnn"]  # ngram is not upstream of rnn
    assert [r["outcome"] for r in report["results"]] == ["ran"] * 3
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert set(lock) == {"download", "tokenizer", "rnn"}

    # Nothing changed: DVC skips every stage, Prefect caches nothing on top.
    again = lmpipe_pipeline(stages=["rnn"], root=str(root))
    assert [r["outcome"] for r in again["results"]] == ["up to date"] * 3
    assert started(root) == ["download", "tokenizer", "rnn"]


def test_exit_1_is_retried_with_backoff(prefect_api, fake):
    from pipeline.flow import backoff_delays, lmpipe_pipeline

    assert backoff_delays(3, 10) == [10, 20, 40]
    root = fake({"download": []}, control={"download": "fail 1 2"},
                pipeline={"retries": 2, "retry_delay_s": 0})
    report = lmpipe_pipeline(root=str(root))
    assert attempts(root, "download") == 3  # two failures, then success
    assert report["results"][0]["outcome"] == "ran"


def test_exit_2_is_not_retried_and_only_dependents_are_skipped(prefect_api, fake):
    from pipeline.flow import PipelineFailed, lmpipe_pipeline

    root = fake({"download": [], "ngram": ["download"], "rnn": ["download"],
                 "evaluate": ["ngram", "rnn"]},
                control={"ngram": "fail 2 9"}, pipeline={"retries": 3, "retry_delay_s": 0})
    with pytest.raises(PipelineFailed) as info:
        lmpipe_pipeline(root=str(root))
    err = info.value
    assert attempts(root, "ngram") == 1, "a params/input error must not be retried"
    assert list(err.failures) == ["ngram"]
    assert err.skipped == ["evaluate"]
    text = str(err)
    assert "stage 'ngram' failed: its command exited with 2" in text
    assert "simulated failure 1" in text  # the log tail
    assert attempts(root, "rnn") == 1 and "evaluate" not in started(root)


def test_retry_condition_reads_the_exception():
    from prefect.states import Failed

    from pipeline.flow import StageFailed, retry_unless_input_error

    def state(exc):
        return Failed(data=exc)

    assert retry_unless_input_error(None, None, state(StageFailed("x", 1, 255, "", "l")))
    assert not retry_unless_input_error(None, None, state(StageFailed("x", 2, 255, "", "l")))
    # DVC failing on its own (bad dvc.yaml, missing dep): retrying cannot help...
    assert not retry_unless_input_error(None, None, state(StageFailed("x", None, 255, "ERROR: "
                                        "missing dependency", "l")))
    # ...unless another DVC process held the repo lock.
    assert retry_unless_input_error(None, None, state(StageFailed("x", None, 255, "ERROR: "
                                    "Unable to acquire lock", "l")))


def test_parallel_task_runner_serialises_repro_per_checkout(prefect_api, fake):
    """Dask (the runner a cluster would use; `thread` goes through the same code path)."""
    from pipeline.flow import lmpipe_pipeline

    root = fake({"download": [], "ngram": ["download"], "rnn": ["download"]},
                control={"ngram": "sleep 1", "rnn": "sleep 1"})
    report = lmpipe_pipeline(root=str(root), task_runner="dask")
    assert sorted(r["stage"] for r in report["results"]) == ["download", "ngram", "rnn"]
    spans = {}
    for line in (root / "control" / "order.log").read_text().splitlines():
        name, what, t = line.split()
        spans.setdefault(name, {})[what] = float(t)
    a, b = spans["ngram"], spans["rnn"]
    assert a["end"] <= b["start"] or b["end"] <= a["start"], "two dvc repro ran at once"


def test_unknown_task_runner_is_an_input_error():
    from pipeline.flow import make_task_runner

    with pytest.raises(InputError, match="unknown task runner"):
        make_task_runner("slurm")


# ----------------------------------------------------------------------------- the lock
HOLDER = textwrap.dedent("""\
    import sys, time
    from pipeline.lock import RunLock
    with RunLock(sys.argv[1], stages=["pretrain"]):
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
""")


def _hold(root: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(root), str(seconds)],
                            stdout=subprocess.PIPE, text=True, cwd=T.REPO)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_run_fails_clearly_or_waits(tmp_path):
    from pipeline.lock import LockHeld, RunLock

    holder = _hold(tmp_path, 3)
    try:
        with pytest.raises(LockHeld) as info:
            RunLock(tmp_path, wait_s=0).acquire()
        msg = str(info.value)
        assert "another lmpipe run holds" in msg and ".lmpipe/run.lock" in msg
        assert f"pid {holder.pid}" in msg and "since 20" in msg and "pretrain" in msg
        assert "--wait" in msg
        # The CLI says the same, exits 1, and starts nothing.
        shutil.copytree(T.REPO / "pipeline", tmp_path / "pipeline")   # a checkout's flow code
        proc = subprocess.run([str(T.BIN / "lmpipe"), "run"], cwd=tmp_path, capture_output=True,
                              text=True, env=T.test_env(LMPIPE_ROOT=str(tmp_path)))
        assert proc.returncode == 1, proc.stderr
        assert "another lmpipe run holds" in proc.stderr
        t0 = time.monotonic()
        with RunLock(tmp_path, wait_s=60, poll_s=0.1):  # --wait: queues behind the holder
            assert time.monotonic() - t0 > 0.5
    finally:
        holder.wait(10)
    with RunLock(tmp_path, wait_s=0):  # released when the holder exited
        pass


def test_flow_refuses_a_busy_checkout(prefect_api, fake):
    from pipeline.flow import lmpipe_pipeline
    from pipeline.lock import LockHeld

    root = fake({"download": []})
    holder = _hold(root, 3)
    try:
        with pytest.raises(LockHeld):
            lmpipe_pipeline(root=str(root), lock_wait_s=0)
        assert started(root) == []
    finally:
        holder.wait(10)


# ----------------------------------------------------------------------------- reporting
def test_markdown_table_from_evaluate_else_stage_metrics():
    from lmpipe.tracking.pipeline_run import metrics_markdown

    md = metrics_markdown({
        "evaluate": {"rnn": {"test_ppl": 9.5, "test_bpb": 2.25},
                     "transformer": {"test_ppl": 6.25, "test_bpb": 1.875, "params": 12000}},
        "pretrain": {"val_bpb": 1.9},
    })
    lines = md.splitlines()
    assert lines[0] == "## lmpipe evaluation (metrics/evaluate.json)"
    assert lines[2] == "| model | test_bpb | test_ppl | params |"
    assert lines[4].startswith("| transformer | 1.875 | 6.25 | 12,000 |")  # best bpb first
    assert lines[5].startswith("| rnn | 2.25 | 9.5 |")

    md = metrics_markdown({"download": {"bytes_train": 1000, "source": "url"},
                           "pretrain": {"val_bpb": 1.9, "val_ppl": 5.0}},
                          [{"stage": "pretrain", "outcome": "ran", "seconds": 1.5}])
    assert "## lmpipe stage metrics" in md
    assert "| stage | val_bpb | val_ppl | bytes_train |" in md
    assert "| pretrain | 1.9 | 5.0 |  |" in md
    assert "| pretrain | ran | 1.5 |" in md


def test_parent_run_children_artifacts_and_markdown(prefect_api, fake, monkeypatch, mlflow_uri):
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from lmpipe.core.records import lock_md5 as dvc_lock_md5
    from pipeline.flow import lmpipe_pipeline

    root = fake({"download": [], "evaluate": ["download"]})
    monkeypatch.setenv("LMPIPE_TRACKING", "on")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    md5_before = dvc_lock_md5(root)
    report = lmpipe_pipeline(root=str(root))
    client = MlflowClient(mlflow_uri)
    parent = client.get_run(report["parent_run_id"])
    tags = parent.data.tags
    assert tags["dvc_lock_md5_start"] == md5_before == "none"
    assert tags["dvc_lock_md5"] == tags["dvc_lock_md5_end"] == dvc_lock_md5(root)
    assert tags["git_commit"] == T.sh(["git", "rev-parse", "HEAD"], root).stdout.strip()
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"dvc.lock", "metrics", "summary.md"} <= arts
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "metrics")} == {
        "metrics/download.json", "metrics/evaluate.json"}
    assert "evaluate.transformer.test_bpb" in parent.data.metrics
    child_ids = [ln.split()[1] for ln in (root / "control" / "runs.log").read_text().splitlines()]
    assert len(child_ids) == 2
    for cid in child_ids:
        assert client.get_run(cid).data.tags["mlflow.parentRunId"] == parent.info.run_id

    async def read():
        async with get_client() as c:
            return await c.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["lmpipe-metrics"])))

    import asyncio

    arts = asyncio.run(read())
    assert any("| transformer |" in (a.data or "") for a in arts)


# ----------------------------------------------------------------------------- retraining
def test_retrain_promotes_pushes_and_commits(prefect_api, fake, monkeypatch, mlflow_uri,
                                             tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.retrain import lmpipe_retrain

    remote = tmp_path / "dvc-remote"
    # No evaluate stage yet: the model is judged on its own stage's val_bpb.
    root = fake({"download": [], "pretrain": ["download"]},
                pipeline={"commit_branch": "lmpipe/retrain", "registry_prefix": "rt-"})
    monkeypatch.setenv("LMPIPE_TRACKING", "on")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    monkeypatch.setenv("LMPIPE_DVC_REMOTE", str(remote))
    head = T.sh(["git", "rev-parse", "HEAD"], root).stdout.strip()
    report = lmpipe_retrain(root=str(root))
    decisions = {d["model"]: d for d in report["promotion"]}
    # no sft or lora stage here: reported as skipped, never silently left out
    assert {m: d["action"] for m, d in decisions.items()} == {
        "transformer": "promoted", "sft": "skipped", "lora": "skipped"}
    assert decisions["lora"]["reason"] == ("no model at data/models/lora/merged (stage 'lora' "
                                           "has not published one)")
    decision = decisions["transformer"]
    assert decision["registered_model"] == "rt-transformer"
    assert decision["action"] == "promoted" and "no champion yet" in decision["reason"]
    assert decision["bpb_source"] == "pretrain.val_bpb"
    client = MlflowClient(mlflow_uri)
    champ = client.get_model_version_by_alias("rt-transformer", "champion")
    assert str(champ.version) == decision["version"] and champ.run_id == report["pipeline"][
        "parent_run_id"]
    assert "model.safetensors" in {os.path.basename(a.path) for a in client.list_artifacts(
        champ.run_id, "models/transformer")}
    assert "dvc push to lmpipe" in report["push"] and any(remote.rglob("*"))
    assert report["commit"].startswith("committed dvc.lock, metrics/")
    assert "to branch lmpipe/retrain" in report["commit"]
    # The checkout itself is untouched: same HEAD, dvc.lock still uncommitted there.
    assert T.sh(["git", "rev-parse", "HEAD"], root).stdout.strip() == head
    shown = T.sh(["git", "show", "lmpipe/retrain:dvc.lock"], root).stdout
    assert shown == (root / "dvc.lock").read_text()
    assert T.sh(["git", "show", "lmpipe/retrain:metrics/pretrain.json"], root).stdout == (
        root / "metrics" / "pretrain.json").read_text()
    # The source is re-checked: download ran again (forced), nothing downstream changed.
    again = lmpipe_retrain(root=str(root))
    outcomes = {r["stage"]: r["outcome"] for r in again["pipeline"]["results"]}
    assert outcomes == {"download": "ran", "pretrain": "up to date"}
    assert [d["action"] for d in again["promotion"]] == ["unchanged", "skipped", "skipped"]
    assert "unchanged" in again["commit"]


def test_promotion_follows_bpb_history(mlflow_uri, tmp_path):
    """champion moves only on improvement; a worse model is kept out with its reason."""
    from mlflow.tracking import MlflowClient

    from lmpipe.tracking.registry import decide, register_and_promote

    assert decide(1.8, None) == (True, "no champion yet; new bpb 1.8000")
    assert decide(1.8, 1.9, 0.0, "3")[0] is True
    assert decide(1.85, 1.9, 0.1, "3")[0] is False
    assert decide(2.0, 1.9, 0.0, "3")[1].endswith("champion kept")

    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("registry-test") or None
    exp_id = exp.experiment_id if exp else client.create_experiment(
        "registry-test", artifact_location=(tmp_path / "art").as_uri())
    folder = tmp_path / "data" / "models" / "transformer"
    folder.mkdir(parents=True)
    history = [(1.90, "promoted"), (2.10, "kept"), (1.70, "promoted"), (1.70, "kept")]
    for i, (bpb, expected) in enumerate(history):
        (folder / "model.safetensors").write_bytes(bytes([i]) * 32)
        lock = {"stages": {"pretrain": {"outs": [{"path": "data/models/transformer",
                                                  "md5": f"{i:032x}.dir"}]}}}
        (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
        run = client.create_run(exp_id)
        metrics = {"evaluate": {"transformer": {"test_bpb": bpb}}}
        d = register_and_promote(client, run.info.run_id, "transformer", folder, metrics,
                                 tmp_path, prefix="hist-")
        assert d.action == expected, d
        mv = client.get_model_version("hist-transformer", d.version)
        assert mv.tags["promotion"] == expected and mv.tags["promotion_reason"] == d.reason
    champ = client.get_model_version_by_alias("hist-transformer", "champion")
    assert str(champ.version) == "3" and champ.tags["bpb"].startswith("1.7")
    # Same files again (same md5 in dvc.lock): no new version at all.
    d = register_and_promote(client, client.create_run(exp_id).info.run_id, "transformer",
                             folder, {"pretrain": {"val_bpb": 1.0}}, tmp_path, prefix="hist-")
    assert d.action == "unchanged" and d.version == "4"


def test_run_dry_run_prints_the_order(tmp_path):
    root = T.make_fake_project(tmp_path / "p", {"download": [], "tokenizer": ["download"],
                                                "ngram": ["tokenizer"]})
    proc = subprocess.run([str(T.BIN / "lmpipe"), "run", "--dry-run", "--stages", "ngram"],
                          cwd=root, capture_output=True, text=True,
                          env=T.test_env(LMPIPE_ROOT=str(root)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["download", "tokenizer", "(after", "download)", "ngram",
                                   "(after", "tokenizer)"]
    help_text = subprocess.run([str(T.BIN / "lmpipe"), "run", "--help"], capture_output=True,
                               text=True).stdout
    assert "lmpipe run --stages pretrain,evaluate" in help_text

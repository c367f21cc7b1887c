"""The pipeline as a user drives it: `dvc repro` in a fresh git + DVC repo on the smoke profile."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.helpers.repo import make_repo, ran_stages, run

# Heavy: real stages, DVC repos or a Prefect server (`make test-fast` leaves them out).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def repo(tmp_path_factory, mirror):
    root = tmp_path_factory.mktemp("dvcrepo")
    env = make_repo(root, mirror)
    return root, env


def _mlflow_runs(root, stage):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("lmpipe")
    return client.search_runs([exp.experiment_id], filter_string=f"tags.dvc_stage = '{stage}'")


def test_repro_runs_caches_and_reruns_only_what_changed(repo):
    root, env = repo
    first = run(["dvc", "repro", "tokenizer"], root, env)
    assert ran_stages(first.stdout) == ["params", "download", "tokenizer"], first.stdout
    for path in ["data/corpus/train.parquet", "data/tokens/meta.json", "data/tokenizer/tokenizer.model"]:
        assert (root / path).exists(), path
    metrics = json.loads((root / "metrics" / "tokenizer.json").read_text())
    assert metrics["vocab_size"] == yaml.safe_load((root / "params.yaml").read_text())["tokenizer"]["vocab_size"]

    again = run(["dvc", "repro", "tokenizer"], root, env)
    assert ran_stages(again.stdout) == [], again.stdout

    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-q", "-m", "smoke run"], root, env)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["tokenizer"]["vocab_size"] += 64
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = run(["dvc", "repro", "tokenizer"], root, env)
    assert ran_stages(changed.stdout) == ["params", "tokenizer"], changed.stdout

    diff = run(["dvc", "params", "diff", "--json"], root, env)
    assert json.loads(diff.stdout)["params.yaml"]["tokenizer.vocab_size"]["new"] == params["tokenizer"]["vocab_size"]
    mdiff = json.loads(run(["dvc", "metrics", "diff", "--json"], root, env).stdout)
    assert mdiff["metrics/tokenizer.json"]["vocab_size"]["diff"] == 64

    # One MLflow run per executed stage, with params, metrics and lineage tags.
    downloads, tokenizers = _mlflow_runs(root, "download"), _mlflow_runs(root, "tokenizer")
    assert len(downloads) == 1 and len(tokenizers) == 2
    newest = max(tokenizers, key=lambda r: r.info.start_time)
    assert newest.data.params["tokenizer.vocab_size"] == str(params["tokenizer"]["vocab_size"])
    assert newest.data.metrics["vocab_size"] == params["tokenizer"]["vocab_size"]
    assert newest.data.tags["git_commit"] == run(["git", "rev-parse", "HEAD"], root, env).stdout.strip()
    assert newest.data.tags["git_dirty"] == "true"  # params.yaml was edited after the commit
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    corpus_dep = next(d for d in lock["stages"]["tokenizer"]["deps"] if d["path"].startswith("data/corpus"))
    assert newest.data.tags[f"dvc_dep.{corpus_dep['path']}"] == corpus_dep["md5"]


def test_editing_a_file_a_stage_imports_makes_it_stale(repo):
    """dvc.yaml's deps cover each stage's import closure (tests/test_architecture.py), so an
    edit anywhere in it is seen: here a module the old, hand-picked deps did not list."""
    root, env = repo
    run(["dvc", "repro", "tokenizer"], root, env)

    def stale() -> dict:
        return json.loads(run(["dvc", "status", "--json", "download", "tokenizer"], root,
                              env).stdout)

    assert stale() == {}
    edited = root / "lmpipe" / "data" / "corpus.py"     # imported by download and tokenizer
    original = edited.read_text()
    edited.write_text(original + "\n# an edit\n")
    try:
        after_edit = stale()
    finally:
        edited.write_text(original)
    assert set(after_edit) == {"download", "tokenizer"}, after_edit
    assert "lmpipe/data/corpus.py" in json.dumps(after_edit["download"])
    assert stale() == {}


def test_bad_params_stop_the_stage_with_exit_2(repo):
    root, env = repo
    params_text = (root / "params.yaml").read_text()
    params = yaml.safe_load(params_text)
    params["tokenizer"]["vocab_size"] = 12
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = (root / "data" / "tokenizer" / "tokenizer.model").read_bytes()
    try:
        proc = run(["python", "-m", "stages.tokenizer"], root, env, check=False)
    finally:
        (root / "params.yaml").write_text(params_text)
    assert proc.returncode == 2
    assert "tokenizer.vocab_size: must be >= 256, got 12" in proc.stderr
    assert (root / "data" / "tokenizer" / "tokenizer.model").read_bytes() == before


def test_readme_compare_commands_work(repo):
    """README: `dvc exp run -S ...` re-runs with a changed param; `mlflow ui` serves the runs."""
    import socket
    import subprocess
    import time
    import urllib.request

    root, env = repo
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-q", "-m", "before experiment", "--allow-empty"], root, env)
    exp = run(["dvc", "exp", "run", "-S", "tokenizer.vocab_size=512", "tokenizer"], root, env)
    assert "Running stage 'tokenizer'" in exp.stdout, exp.stdout
    assert json.loads((root / "metrics" / "tokenizer.json").read_text())["vocab_size"] == 512

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ui = subprocess.Popen(
        ["mlflow", "ui", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"],
        cwd=root, env={**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/search?max_results=10"
        deadline, body = time.time() + 120, None
        while time.time() < deadline and body is None:
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    body = json.loads(resp.read())
            except OSError:
                time.sleep(1)
        assert body is not None, "mlflow ui did not answer within 120 s"
        assert "lmpipe" in [e["name"] for e in body["experiments"]]
    finally:
        ui.terminate()
        ui.wait(timeout=30)

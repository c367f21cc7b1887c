"""`lmpipe sweep --local 2` on this machine, the real stages on the smoke profile: a sweep of
the tokenizer's vocabulary from a file of param sets, two of them bad.

- `tokenizer.vocab_size: 100` reaches a worker, where the stage rejects it (exit 2): that
  point fails alone and is not retried; `tokenizer.vocab_siz` is no key of params.yaml: the
  sweep refuses that point before any worker sees it. The sweep exits 2.
- The good points finish as DVC experiments of the checkout, which the sweep never touched
  (no data/, no modified file) until `lmpipe sweep apply` puts the best one there.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.helpers.repo import make_repo

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
SETS = """\
- {tokenizer.vocab_size: 352}
- tokenizer: {vocab_size: 384}
- {tokenizer.vocab_size: 100}   # below the schema's 256: the stage exits 2 on the worker
- {tokenizer.vocab_siz: 300}    # no such key: refused before submission
"""


@pytest.fixture(scope="module")
def swept(tmp_path_factory, mirror):
    root = tmp_path_factory.mktemp("sweep-local")
    env = make_repo(root, mirror)
    env.pop("PREFECT_API_URL", None)
    env["PREFECT_HOME"] = str(root / ".prefect")
    (root / "sets.yaml").write_text(SETS)  # untracked: the sweep runs the commit
    proc = subprocess.run(
        [str(BIN / "lmpipe"), "sweep", "--params-file", "sets.yaml", "--stages", "tokenizer",
         "--target", "tokenizer.val_bytes_per_token", "--maximize", "--local", "2",
         "--name", "tok"], cwd=root, env=env, capture_output=True, text=True, timeout=1500)
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                            capture_output=True, text=True).stdout
    return {"root": root, "env": env, "proc": proc, "status": status,
            "had_data": (root / "data").exists()}


def _lmpipe(swept, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "lmpipe"), *args], cwd=swept["root"], env=swept["env"],
                          capture_output=True, text=True, timeout=300)


def test_bad_points_fail_alone_and_the_sweep_exits_2(swept):
    proc = swept["proc"]
    log = proc.stderr + proc.stdout
    assert proc.returncode == 2, log[-6000:]
    assert "tok-4  tokenizer.vocab_siz=300  BAD (exit 2): params.yaml: Could not override " \
           "'tokenizer.vocab_siz'" in log
    assert "tok-3: failed" in log and "tok-3: failed (" not in log  # failed, not rescheduled
    assert "rescheduled" not in log
    assert "tok-1: completed" in log and "tok-2: completed" in log
    # the sweep ran in the workers' clones: this checkout is as it was
    assert swept["status"] == "" and not swept["had_data"]
    assert not (Path(tempfile.gettempdir()) / "lmpipe-sweep-tok").exists()


def test_mlflow_records_every_point_and_why_the_bad_ones_failed(swept):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(swept["env"]["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("lmpipe")
    parent = client.search_runs([exp.experiment_id], "tags.`lmpipe.sweep_role` = 'sweep'")[0]
    assert parent.info.status == "FAILED"
    kids = {r.info.run_name: r for r in client.search_runs(
        [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")}
    assert sorted(kids) == ["tok-1", "tok-2", "tok-3", "tok-4", "tok-base"]
    for name in ("tok-1", "tok-2", "tok-base"):
        assert kids[name].info.status == "FINISHED", kids[name].data.tags.get("lmpipe.error")
    assert kids["tok-1"].data.params == {"tokenizer.vocab_size": "352"}
    assert kids["tok-2"].data.metrics["tokenizer.vocab_size"] == 384
    for name, why in (("tok-3", "tokenizer.vocab_size: must be >= 256, got 100"),
                      ("tok-4", "Could not override 'tokenizer.vocab_siz'")):
        tags = kids[name].data.tags
        assert kids[name].info.status == "FAILED"
        assert tags["lmpipe.exit_code"] == "2" and why in tags["lmpipe.error"], tags
    # download ran once, in the base; each good point ran only the tokenizer
    ran = {}
    for name, kid in kids.items():
        for s in client.search_runs([exp.experiment_id],
                                    f"tags.`mlflow.parentRunId` = '{kid.info.run_id}'"):
            ran.setdefault(s.data.tags["dvc_stage"], []).append(name)
    assert ran["download"] == ["tok-base"]
    # (tok-3's stage refused its params before it started: no run of it)
    assert sorted(ran["tokenizer"]) == ["tok-1", "tok-2"]


def test_the_good_points_are_experiments_of_the_checkout(swept):
    shown = json.loads(subprocess.run([str(BIN / "dvc"), "exp", "show", "--json"],
                                      cwd=swept["root"], env=swept["env"], capture_output=True,
                                      text=True, check=True).stdout)
    names = {e["name"] for b in shown for e in (b.get("experiments") or []) if e.get("name")}
    assert names == {"tok-1", "tok-2", "tok-base"}


def test_report_and_apply_put_the_best_point_in_the_workspace(swept):
    proc = _lmpipe(swept, "sweep", "report", "tok")
    assert proc.returncode == 0, proc.stderr
    rows = [r.split("|") for r in proc.stdout.splitlines() if r.startswith("| tok-")]
    assert [r[1].strip() for r in rows][2:] == ["tok-3", "tok-4"]  # failed points last
    values = [float(r[3]) for r in rows[:2]]
    assert values == sorted(values, reverse=True)  # --maximize: highest first
    best_vocab = int(rows[0][2])
    # the params check (the first stage of every run) names the key before anything runs
    assert rows[2][-2].strip().startswith("exit 2: stage params: error: params.yaml: "
                                          "tokenizer.vocab_size: must be >= 256, got 100")
    assert rows[3][-2].strip().startswith("exit 2: params.yaml: Could not override")
    assert (swept["root"] / ".lmpipe/sweeps/tok/report.png").stat().st_size > 10_000

    proc = _lmpipe(swept, "sweep", "apply", "tok")
    assert proc.returncode == 0, proc.stderr
    root = swept["root"]
    assert yaml.safe_load((root / "params.yaml").read_text())["tokenizer"]["vocab_size"] \
        == best_vocab
    meta = json.loads((root / "data/tokens/meta.json").read_text())
    assert meta["vocab_size"] == best_vocab
    assert (root / "data/tokenizer/tokenizer.model").is_file()

"""Tweak params.yaml and compare, as users do (issue 16), on a fresh git + DVC copy of the
project (smoke profile, training cut to a few steps):

- the README's "Change a param and compare" commands work as written: a baseline
  experiment, one changed param, `lmpipe compare`, `dvc exp show`, `dvc plots diff`;
- each `dvc exp run` is one MLflow pipeline run holding the whole params, every stage's
  final metrics and the DVC experiment's name, with every stage run as its child; two such
  runs differ, through MLflow's REST API, in exactly the changed param;
- a typo or a bad value, in params.yaml or through `-S`, stops `dvc repro` / `dvc exp run`
  before DVC deletes any out; every stage, training ones included, comes back from DVC's run
  cache; a failing stage keeps its last good metrics file;
- a Python without the project installed is named, before DVC deletes anything.

Tests run in file order on one repo (a full pipeline run costs minutes on 2 cores); each
leaves the workspace as it found it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
import venv
from pathlib import Path

import pytest

from lmpipe.core.names import STAGES
from lmpipe.core.profiles import deep_merge, dump_params, profile_dict
from tests.conftest import REPO
from tests.helpers.repo import make_repo, run

pytestmark = pytest.mark.slow

FEW_STEPS = {"max_steps": 8, "eval_every": 4, "checkpoint_every": 4, "warmup_steps": 2,
             "log_every": 2}
SHORTER = {
    "download": {"max_bytes": 100000, "instruct": {"max_rows": 64}},
    "rnn": {"train": FEW_STEPS},
    "pretrain": {"train": FEW_STEPS},
    "sft": {"epochs": None, "train": {**FEW_STEPS, "max_tokens": None}},
    "lora": {"epochs": None, "train": {**FEW_STEPS, "max_tokens": None}},
    "evaluate": {"max_tokens": 1024},
}
OUT_FOLDERS = ("data", "metrics", "plots", "reports")


@pytest.fixture(scope="module")
def repo(tmp_path_factory, mirror):
    root = tmp_path_factory.mktemp("experiments")
    env = make_repo(root, mirror)
    (root / "params.yaml").write_text(dump_params(deep_merge(profile_dict("smoke"), SHORTER)))
    run(["git", "commit", "-qam", "smoke params, short training"], root, env)
    # a fresh clone is not set up to stage DVC's files: users start without autostage
    run(["dvc", "config", "--unset", "core.autostage"], root, env)
    return root, env


def snapshot(root: Path) -> dict[str, str]:
    """md5 of every file DVC's outs hold (checkpoints, which are not outs, left out)."""
    out = {}
    for folder in OUT_FOLDERS:
        for f in sorted((root / folder).rglob("*")):
            rel = f.relative_to(root).as_posix()
            if f.is_file() and not rel.startswith("data/checkpoints/"):
                out[rel] = hashlib.md5(f.read_bytes()).hexdigest()
    return out


def readme_commands(section: str) -> list[str]:
    """The commands of the first ```sh block under README heading `section`."""
    text = (REPO / "README.md").read_text()
    body = text[text.index(section):]
    block = body[body.index("```sh") + 5:]
    block = block[:block.index("```")]
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def pipeline_runs(root: Path, timeout: float = 120) -> dict[str, dict]:
    """The pipeline runs of the store, by DVC experiment name, once each is closed (the
    process that closes one waits for its `dvc` process to exit)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("lmpipe")
    deadline = time.time() + timeout
    while True:
        runs = client.search_runs([exp.experiment_id], "tags.`lmpipe.kind` = 'pipeline'")
        if all(r.info.status != "RUNNING" for r in runs) or time.time() > deadline:
            return {r.data.tags.get("dvc_exp_name"): r for r in runs}
        time.sleep(1)


# ----------------------------------------------------------------------------- compare
def test_readme_compare_section_runs_as_written_on_a_fresh_clone(repo):
    """Every command of the README's compare block, as written (the activation line and
    `mlflow ui` aside: the test's PATH is the venv's, and the UI is checked below)."""
    root, env = repo
    commands = readme_commands("### Change a param and compare")
    assert commands[0].startswith("source .venv/bin/activate")
    outputs = {}
    terminal = {**env, "COLUMNS": "200"}    # dvc exp show lays its table out for a terminal
    for cmd in commands[1:]:
        proc = run(["bash", "-c", cmd], root, terminal, timeout=1500)
        outputs[cmd.split()[1] if cmd.startswith("dvc") else cmd.split()[0]] = proc.stdout
    # lmpipe compare: exactly the changed param, then bits per byte per model
    compare = next(out for cmd, out in outputs.items() if cmd == "lmpipe")
    params_block = compare.split("params that differ (")[1].split("\n\n")[0]
    assert params_block.startswith("1):"), compare
    assert re.search(r"ngram\.order\s+3 -> 5", params_block), compare
    ngram_rows = [line for line in compare.splitlines() if line.strip().startswith("ngram ")]
    assert [r.split()[1] for r in ngram_rows[:2]] == ["val_bpb", "test_bpb"], compare
    for row in ngram_rows[:2]:          # both runs have a figure, and the change is shown
        a, b, delta = (float(x) for x in row.split()[2:5])
        assert delta == pytest.approx(b - a, abs=2e-4)
    figure = Path(compare.split("loss curves of both runs: ")[1].strip())
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # dvc exp show: a table a terminal can hold, with the changed param and the bpb columns
    table = outputs["exp"]
    header = next(line for line in table.splitlines() if "Experiment" in line).split()
    assert header == ["Experiment", "lora.test_bpb", "ngram.test_bpb", "rnn.test_bpb",
                      "sft.test_bpb", "transformer.test_bpb", "ngram.order"], table
    assert re.search(r"\[order5\]\s+(\S+\s+){5}5\s*$", table, re.M), table
    assert max(len(line) for line in table.splitlines()) <= 160, table
    # dvc plots diff: the bits-per-byte plot, both experiments' rows
    plots = json.loads(outputs["plots"])
    assert "bits_per_byte" in json.dumps(plots)


def test_compare_names_only_real_experiments_when_one_is_unknown(repo):
    """DVC keeps refs/exps/exec/EXEC_HEAD after `dvc exp run`: not an experiment to offer."""
    root, env = repo
    assert run(["git", "for-each-ref", "refs/exps/exec"], root, env).stdout.strip()
    proc = subprocess.run(["lmpipe", "compare", "baseline", "nosuch"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().endswith("experiments here: baseline, order5"), proc.stderr


def test_compare_takes_mlflow_run_ids_whole_or_by_their_first_digits(repo):
    """The pipeline runs of both experiments, one by its full id and one by the 8 digits the
    tables print: the same single param differs; an id no run has is named as not found."""
    root, env = repo
    runs = pipeline_runs(root)
    a, b = runs["baseline"].info.run_id, runs["order5"].info.run_id
    proc = run(["lmpipe", "compare", a[:8], b], root, env, timeout=300)
    assert f"A = MLflow run {a[:8]}" in proc.stdout and f"B = MLflow run {b[:8]}" in proc.stdout
    params_block = proc.stdout.split("params that differ (")[1].split("\n\n")[0]
    assert params_block.startswith("1):") and re.search(r"ngram\.order\s+3 -> 5", params_block), \
        proc.stdout
    missing = "0123abcd" if not any(r.info.run_id.startswith("0123abcd") for r in runs.values()) \
        else "fedc9876"
    proc = subprocess.run(["lmpipe", "compare", missing, b], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and f"MLflow run {missing}: not found" in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def mlflow_ui(repo):
    """`lmpipe ui` on the repo's store (as the README starts it), once the pipeline runs of
    both experiments are closed; yields (its base URL, the link it printed)."""
    root, env = repo
    runs = pipeline_runs(root)
    assert {"baseline", "order5"} <= set(runs), sorted(runs)
    port = free_port()
    ui = subprocess.Popen(["lmpipe", "ui", "--port", str(port)], cwd=root, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        link = ui.stdout.readline().strip().removeprefix("lmpipe ui: ")
        base = f"http://127.0.0.1:{port}"
        assert link.startswith(f"{base}/#/experiments/") and "workflowType=machine_learning" in link
        rest(f"{base}/api/2.0/mlflow/experiments/search?max_results=1")
        yield base, link
    finally:
        ui.terminate()
        ui.wait(timeout=30)


def test_each_experiment_is_one_mlflow_pipeline_run_differing_in_exactly_the_changed_param(
        repo, mlflow_ui):
    """Through MLflow's REST API, as the UI's compare view reads it."""
    root, env = repo
    api = f"{mlflow_ui[0]}/api/2.0/mlflow"
    exp = rest(f"{api}/experiments/get-by-name?experiment_name=lmpipe")["experiment"]
    tags = {t["key"]: t["value"] for t in exp.get("tags", [])}
    assert tags["mlflow.experimentKind"] == "custom_model_development"   # the runs table
    a, b = (pipeline_run_json(api, exp["experiment_id"], n) for n in ("baseline", "order5"))
    pa, pb = ({p["key"]: p["value"] for p in r["data"]["params"]} for r in (a, b))
    assert len(pa) > 150 and set(pa) == set(pb)         # the whole params.yaml, flattened
    assert {k for k in pa if pa[k] != pb[k]} == {"ngram.order"}
    assert (pa["ngram.order"], pb["ngram.order"]) == ("3", "5")
    ma, mb = ({m["key"]: m["value"] for m in r["data"]["metrics"]} for r in (a, b))
    metrics = json.loads((root / "metrics" / "ngram.json").read_text())
    assert mb["ngram.val_bpb"] == pytest.approx(metrics["val_bpb"])
    assert ma["ngram.val_bpb"] != mb["ngram.val_bpb"]
    assert "evaluate.transformer.test_bpb" in ma and "evaluate.transformer.test_bpb" in mb
    tb = {x["key"]: x["value"] for x in b["data"]["tags"]}
    assert tb["mlflow.runName"] == "exp order5 · ngram.order=5"
    assert tb["git_commit"] == run(["git", "rev-parse", "HEAD"], root, env).stdout.strip()
    assert {"git_dirty", "dvc_lock_md5"} <= set(tb) and b["info"]["status"] == "FINISHED"
    # every stage run of the execution is a child of its pipeline run
    children = rest(f"{api}/runs/search", {
        "experiment_ids": [exp["experiment_id"]],
        "filter": f"tags.mlflow.parentRunId = '{b['info']['run_id']}'"})["runs"]
    stages = sorted({x["value"] for r in children for x in r["data"]["tags"]
                     if x["key"] == "dvc_stage"})
    assert stages == ["evaluate", "ngram", "params"]    # what order5 re-ran


def test_mlflow_ui_compare_with_show_diff_only_shows_exactly_the_changed_param(
        repo, mlflow_ui, tmp_path_factory):
    """The real UI in headless Chromium (.ci/run installs Debian's `chromium`): the link
    `lmpipe ui` prints opens the experiment on its runs table; comparing the two pipeline runs
    with "Show diff only" lists the one changed param and the metrics that moved."""
    from tests.helpers.browser import Browser, chromium

    assert chromium(), "headless Chromium is needed: apt-get install chromium (.ci/run does)"
    base, link = mlflow_ui
    api = f"{base}/api/2.0/mlflow"
    exp_id = rest(f"{api}/experiments/get-by-name?experiment_name=lmpipe")["experiment"][
        "experiment_id"]
    a, b = (pipeline_run_json(api, exp_id, n)["info"]["run_id"] for n in ("baseline", "order5"))
    browser = Browser()
    try:
        browser.goto(link)
        browser.wait_for("document.body.innerText.includes('exp order5 · ngram.order=5')")
        assert "Token Usage" not in browser.js("document.body.innerText")   # not GenAI's page
        browser.goto(f'{base}/#/compare-runs?runs=["{a}","{b}"]&experiments=["{exp_id}"]')
        browser.wait_for("document.body.innerText.includes('Show diff only')")
        sections = {}
        for name in ("Parameters", "Metrics"):
            switch = f'document.querySelector(\'[aria-label="{name} - Show diff only"]\')'
            browser.js(f"{switch}.click()")
            browser.wait_for(f"{switch}.getAttribute('aria-checked') === 'true'")
            time.sleep(1)
            sections[name] = browser.js(f"{switch}.parentElement.parentElement.innerText")
        shot = browser.screenshot(tmp_path_factory.mktemp("ui") / "compare-show-diff-only.png")
    finally:
        browser.close()
    rows = [line for line in sections["Parameters"].splitlines()[1:] if line.strip()]
    assert rows == ["ngram.order\t3\t5"], sections["Parameters"]
    assert "evaluate.ngram.test_bpb" in sections["Metrics"]
    assert "download.documents" not in sections["Metrics"]     # equal in both: hidden
    assert shot.read_bytes()[:4] == b"\x89PNG"
    print(f"screenshot: {shot}")


def pipeline_run_json(api: str, experiment_id: str, exp_name: str) -> dict:
    found = rest(f"{api}/runs/search", {"experiment_ids": [experiment_id],
                                        "filter": f"tags.dvc_exp_name = '{exp_name}'"})["runs"]
    assert len(found) == 1, found
    return found[0]


def exp_ref(root: Path, name: str, env: dict) -> str:
    """The commit of DVC experiment `name`."""
    refs = run(["git", "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps"],
               root, env).stdout.split("\n")
    return next(line.split()[0] for line in refs if line.endswith(f"/{name}"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rest(url: str, body: dict | None = None, timeout: float = 120) -> dict:
    """GET (or POST `body` to) MLflow's REST API, waiting for the server to come up."""
    deadline = time.time() + timeout
    while True:
        req = urllib.request.Request(url, data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return json.loads(resp.read())
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(1)


# ----------------------------------------------------------------------------- params safety
def test_a_typo_through_exp_run_stops_before_any_out_is_deleted(repo):
    root, env = repo
    params = (root / "params.yaml").read_text()
    before = snapshot(root)
    try:
        for setting in ("+ngram.orderr=5", "pretrain.train.lr=-1", "+pretrain.train.lrr=0.1"):
            proc = run(["dvc", "exp", "run", "-S", setting], root, env, check=False)
            out = proc.stdout + proc.stderr
            key = setting.lstrip("+").split("=")[0]
            assert proc.returncode != 0, out
            assert re.search(rf"stage params: error: .*{re.escape(key)}: ", out), out
            assert "failed to run: python -m stages.params, exited with 2" in out, out
            assert "Running stage 'ngram'" not in out and "Running stage 'pretrain'" not in out
            assert snapshot(root) == before, setting
            (root / "params.yaml").write_text(params)
    finally:
        (root / "params.yaml").write_text(params)


def test_a_typo_in_params_yaml_stops_dvc_repro_before_any_out_is_deleted(repo):
    root, env = repo
    params = (root / "params.yaml").read_text()
    before = snapshot(root)
    try:
        (root / "params.yaml").write_text(params.replace("  train:\n", "  train:\n    lrr: 1\n", 1))
        proc = run(["dvc", "repro"], root, env, check=False)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0
        assert re.search(r"rnn\.train\.lrr: unknown key", out), out
        assert "exited with 2" in out
        assert snapshot(root) == before
    finally:
        (root / "params.yaml").write_text(params)


def test_every_stage_is_restored_from_the_run_cache(repo):
    """Training stages included: their outs are gone, `dvc repro` brings them back without
    running a single command, byte for byte."""
    root, env = repo
    before = snapshot(root)
    for folder in OUT_FOLDERS:
        for f in (root / folder).iterdir():
            if f.name != "checkpoints":
                shutil.rmtree(f) if f.is_dir() else f.unlink()
    proc = run(["dvc", "repro"], root, env)
    restored = re.findall(r"Stage '(\w+)' is cached - skipping run", proc.stdout)
    assert sorted(restored) == sorted(STAGES), proc.stdout
    assert "Running stage" not in proc.stdout
    assert snapshot(root) == before
    # and through `dvc exp run`: the baseline's value again brings the baseline's results back
    back = run(["dvc", "exp", "run", "-n", "back3", "-S", "ngram.order=3"], root, env)
    assert re.findall(r"Stage '(\w+)' is cached - skipping run", back.stdout) == \
        ["ngram", "evaluate"], back.stdout
    assert re.findall(r"Running stage '(\w+)'", back.stdout) == ["params"], back.stdout
    baseline = run(["git", "show", f"{exp_ref(root, 'baseline', env)}:metrics/ngram.json"], root, env)
    assert (root / "metrics" / "ngram.json").read_text() == baseline.stdout


@pytest.mark.parametrize("how", ["dvc repro", "dvc exp run"])
def test_a_failing_stage_keeps_its_last_good_metrics(repo, how):
    """A vocabulary the corpus cannot support passes the params check and fails inside the
    tokenizer stage, after DVC deleted its outs: its metrics file comes back as it was."""
    root, env = repo
    params = (root / "params.yaml").read_text()
    metrics = (root / "metrics" / "tokenizer.json").read_bytes()
    try:
        if how == "dvc repro":
            (root / "params.yaml").write_text(params.replace("vocab_size: 384", "vocab_size: 60000"))
            proc = run(["dvc", "repro"], root, env, check=False)
        else:
            proc = run(["dvc", "exp", "run", "-S", "tokenizer.vocab_size=60000"], root, env,
                       check=False)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0
        assert "tokenizer.vocab_size: 60000 is too large" in out, out
        assert "put back the last good metrics/tokenizer.json" in out, out
        assert "`dvc checkout tokenizer` brings back data/tokenizer" in out, out
        assert (root / "metrics" / "tokenizer.json").read_bytes() == metrics
    finally:
        (root / "params.yaml").write_text(params)
        run(["dvc", "checkout", "tokenizer"], root, env)
    # the workspace matches dvc.lock again; only the params check, which passed with the
    # bad vocabulary and recorded it, re-runs (in a second) on the next `dvc repro`
    assert set(json.loads(run(["dvc", "status", "--json"], root, env).stdout)) <= {"params"}


def test_a_python_without_the_project_is_named_before_anything_is_deleted(repo, tmp_path):
    """`.venv/bin/dvc repro` without the venv activated: `python` is another interpreter."""
    root, env = repo
    bare = tmp_path / "bare"
    venv.create(bare, with_pip=False)       # a Python without the project installed
    params = (root / "params.yaml").read_text()
    before = snapshot(root)
    dvc = str(Path(env["PATH"].split(os.pathsep)[0]) / "dvc")
    try:
        (root / "params.yaml").write_text(re.sub(r"\n  order: \d+", "\n  order: 4", params))
        proc = run([dvc, "repro"], root, {**env, "PATH": f"{bare / 'bin'}{os.pathsep}/usr/bin:/bin"},
                   check=False)
    finally:
        (root / "params.yaml").write_text(params)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    lines = [line for line in out.splitlines() if "does not have the project installed" in line]
    assert len(lines) == 1 and "source .venv/bin/activate" in lines[0], out
    assert str(bare / "bin" / "python") in lines[0]
    assert "failed to run: python -m stages.params, exited with 2" in out
    assert snapshot(root) == before

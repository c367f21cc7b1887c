"""`lmpipe sweep` without servers: the grid, the file of param sets, the stages a sweep
shares, what the sweep does about each flow-run state, the report, and the command's checks
of its input (exit 2, nothing changed). The sweep itself runs in test_sweep_local.py (on
this machine) and test_sweep_remote.py (loopback services, a worker killed).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import matplotlib.image
import pytest
import yaml
from dvc.utils.hydra import apply_overrides

from lmpipe.core.errors import InputError
from lmpipe.core.profiles import dump_params, profile_dict
from lmpipe.core.records import read_dvc_yaml
from lmpipe.evaluation.plots import plot_sweep
from lmpipe.tracking.sweep import PointRow, build_report, default_target
from pipeline.graph import StageGraph, read_stage_graph
from pipeline.sweep_plan import (
    check_name,
    combine,
    expand_grid,
    override_error,
    read_param_sets,
    split_stages,
)
from pipeline.sweep_submit import decide
from tests.conftest import REPO
from tests.helpers.repo import make_repo

BIN = Path(__import__("sys").executable).parent


# ----------------------------------------------------------------------------- the grid
def test_the_grid_is_dvcs_expansion_of_set_param():
    assert expand_grid(["pretrain.train.lr=0.003,0.006", "pretrain.model.n_layer=range(2,5,2)"]) \
        == [("pretrain.train.lr=0.003", "pretrain.model.n_layer=2"),
            ("pretrain.train.lr=0.003", "pretrain.model.n_layer=4"),
            ("pretrain.train.lr=0.006", "pretrain.model.n_layer=2"),
            ("pretrain.train.lr=0.006", "pretrain.model.n_layer=4")]
    # a list is one value; a params file other than params.yaml keeps its prefix
    assert expand_grid(["evaluate.models=[rnn,ngram]", "seed=7"]) == \
        [("evaluate.models=[rnn,ngram]", "seed=7")]
    assert expand_grid(["other.yaml:a=1,2"]) == [("other.yaml:a=1",), ("other.yaml:a=2",)]


@pytest.mark.parametrize("args, message", [
    (["pretrain.train.lr"], "-S pretrain.train.lr: expected KEY=VALUE"),
    (["a=1,,2"], "-S: Error parsing override 'a=1,,2'"),
])
def test_a_bad_set_param_names_itself(args, message):
    with pytest.raises(InputError, match="^" + message.replace("(", r"\(")):
        expand_grid(args)


def test_param_sets_from_a_file_apply_as_written(tmp_path):
    sets = tmp_path / "sets.yaml"
    sets.write_text(
        "- pretrain: {train: {lr: 0.003}}\n"
        "  tokenizer.vocab_size: 512\n"
        "- {pretrain.train.lr: 1.0e-2, sft.system_prompt: \"It's: a, test\","
        " evaluate.models: [rnn, ngram], pretrain.train.max_seconds: null}\n")
    got = read_param_sets(sets)
    assert got[0] == ("pretrain.train.lr=0.003", "tokenizer.vocab_size=512")
    # DVC's own -S code reads each value back as the file wrote it
    params = tmp_path / "params.yaml"
    for overrides, raw in zip(got, yaml.safe_load(sets.read_text())):
        params.write_text(dump_params(profile_dict("smoke")))
        apply_overrides(params, list(overrides))
        back = yaml.safe_load(params.read_text())
        for o in overrides:
            key = o.split("=", 1)[0]
            node = back
            for part in key.split("."):
                node = node[part]
            want = raw.get(key, None)
            if want is None and key not in raw:  # nested in the file
                want = raw
                for part in key.split("."):
                    want = want[part]
            assert node == want, (key, node, want)


@pytest.mark.parametrize("text, message", [
    ("pretrain.train.lr: 0.1\n", "expected a non-empty list of param sets"),
    ("- {seed: 1}\n- 7\n", "line 2: param set 2 is not a mapping"),
    ("- {seed: 1}\n- {seed: [2}\n", "line 2 not valid YAML"),
])
def test_a_bad_param_file_names_the_file_and_line(tmp_path, text, message):
    path = tmp_path / "sets.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=f"{path}:.*{message}".replace("[", r"\[")):
        read_param_sets(path)
    with pytest.raises(InputError, match="file not found"):
        read_param_sets(tmp_path / "missing.yaml")


def test_file_sets_combine_with_the_grid_and_the_grid_wins():
    got = combine([("seed=1", "pretrain.train.lr=0.1"), ("seed=2",)],
                  [("pretrain.train.lr=0.003",), ("pretrain.train.lr=0.006",)])
    assert got == [("seed=1", "pretrain.train.lr=0.003"), ("seed=1", "pretrain.train.lr=0.006"),
                   ("seed=2", "pretrain.train.lr=0.003"), ("seed=2", "pretrain.train.lr=0.006")]


def test_sweep_names_become_git_refs():
    assert check_name("lr-sweep_2.b") == "lr-sweep_2.b"
    for bad in ("-x", "a b", "a..b", "a/b", "x.lock", "a" * 64):
        with pytest.raises(InputError, match="--name"):
            check_name(bad)


def test_overrides_are_checked_against_params_at_the_commit(tmp_path):
    (tmp_path / "params.yaml").write_text("a:\n  b: 1\n")
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin"}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "p"]):
        subprocess.run(cmd, cwd=tmp_path, env=env, check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True,
                            text=True).stdout.strip()
    (tmp_path / "params.yaml").write_text("a:\n  b: 1\n  c: 2\n")  # not committed: ignored
    assert override_error(tmp_path, commit, ("a.b=2",)) is None
    err = override_error(tmp_path, commit, ("a.c=2",))
    assert err.startswith("params.yaml: Could not override 'a.c'") and "no such key" in err
    assert override_error(tmp_path, commit, ("x.yaml:a=1",)) == \
        f"x.yaml: not in commit {commit[:12]}"


# ----------------------------------------------------------------------------- stages
def test_a_stage_is_shared_unless_a_swept_key_reaches_it():
    graph = StageGraph({"download": set(), "tokenizer": {"download"}, "ngram": {"tokenizer"},
                        "pretrain": {"tokenizer"}, "evaluate": {"ngram", "pretrain"}})
    spec = {"download": {"params": ["seed", "download"]}, "tokenizer": {"params": ["tokenizer"]},
            "ngram": {"params": ["ngram"]},
            "pretrain": {"params": [{"params.yaml": ["pretrain.train"]}]},
            "evaluate": {"params": ["evaluate"]}}
    order = graph.stages
    assert split_stages(graph, spec, ["pretrain.train.lr"], order) == \
        (["pretrain", "evaluate"], ["download", "tokenizer", "ngram"])
    assert split_stages(graph, spec, ["pretrain"], order)[0] == ["pretrain", "evaluate"]
    assert split_stages(graph, spec, ["seed"], order) == (order, [])
    assert split_stages(graph, spec, ["pipeline.retries"], order) == ([], order)


def test_sweeping_pretrain_shares_everything_upstream_in_this_project():
    graph = read_stage_graph(REPO)
    affected, shared = split_stages(graph, read_dvc_yaml(REPO), ["pretrain.train.lr"],
                                    graph.stages)
    assert affected == ["pretrain", "sft", "lora", "evaluate"]
    assert shared == ["download", "tokenizer", "ngram", "rnn"]


def test_default_target_follows_the_swept_section():
    every = ["download", "tokenizer", "rnn", "pretrain", "evaluate"]
    assert default_target(["rnn.train.lr"], every) == "evaluate.rnn.test_bpb"
    assert default_target(["tokenizer.vocab_size"], every) == "evaluate.transformer.test_bpb"
    assert default_target(["pretrain.train.lr"], ["pretrain"]) == "pretrain.val_bpb"
    assert default_target(["tokenizer.vocab_size"], ["tokenizer"]) is None


# ----------------------------------------------------------------------------- retries
@pytest.mark.parametrize("state, message, attempts, action", [
    ("RUNNING", "", 1, "wait"), ("SCHEDULED", "", 2, "wait"), ("PENDING", "", 1, "wait"),
    ("COMPLETED", "", 3, "done"), ("CANCELLED", "", 1, "failed"),
    ("CRASHED", "no heartbeat for 90 s", 1, "retry"), ("CRASHED", "", 2, "retry"),
    ("CRASHED", "", 3, "failed"), ("FAILED", "PointFailed: dvc exp push exited 1", 1, "retry"),
    ("FAILED", "Flow run encountered an exception: PointInputError: a stage exited 2", 1,
     "bad-input"),
])
def test_what_the_sweep_does_about_a_flow_run(state, message, attempts, action):
    assert decide(state, message, attempts, retries=2) == action


# ----------------------------------------------------------------------------- the report
def _row(name, lr, layers, bpb=None, status="FINISHED", **extra):
    metrics = {"evaluate.ngram.test_bpb": 2.5, "rnn.train_seconds": 10.0,
               "pretrain.train_seconds": 3.0 * int(layers)}
    if bpb is not None:
        metrics.update({"evaluate.transformer.test_bpb": bpb, "pretrain.val_bpb": bpb - 0.1})
    return PointRow(name, status, {"pretrain.train.lr": lr, "pretrain.model.n_layer": layers,
                                   "seed": "1"}, metrics, extra, f"id-{name}")


def test_the_report_sorts_by_the_target_and_keeps_what_differs():
    rows = [_row("s-1", "0.003", "1", 2.41), _row("s-2", "0.003", "2", 2.30),
            _row("s-3", "0.006", "1", None, "FAILED", **{"lmpipe.exit_code": "2",
                 "lmpipe.error": "pretrain.train.lr: must be > 0"}),
            _row("s-4", "0.006", "2", 2.35)]
    rep = build_report(rows, "evaluate.transformer.test_bpb")
    assert [r.name for r in rep.rows] == ["s-2", "s-4", "s-1", "s-3"]
    assert rep.best.name == "s-2"
    assert rep.params == ["pretrain.model.n_layer", "pretrain.train.lr"]  # seed is constant
    keys = [k for k, _ in rep.metrics]
    assert keys[0] == "evaluate.transformer.test_bpb"
    assert "pretrain.val_bpb" in keys and "pretrain.train_seconds" in keys
    # the same in every point: nothing to compare
    assert "evaluate.ngram.test_bpb" not in keys and "rnn.train_seconds" not in keys
    table = rep.markdown("t").splitlines()
    assert table[2].startswith("| point | pretrain.model.n_layer | pretrain.train.lr | "
                               "transformer test_bpb |")
    assert table[4].startswith("| s-2 | 2 | 0.003 | 2.3000 |")
    assert table[-1].endswith("| exit 2: pretrain.train.lr: must be > 0 |")
    assert build_report(rows, "evaluate.transformer.test_bpb", maximize=True).best.name == "s-1"


def test_the_sweep_figure_has_a_panel_per_swept_param(tmp_path):
    points = [({"lr": "0.003", "act": "gelu"}, 2.3), ({"lr": "0.1", "act": "relu"}, 2.5)]
    one = plot_sweep(points, ["lr"], "evaluate.transformer.test_bpb", tmp_path / "one.png")
    two = plot_sweep(points, ["lr", "act"], "evaluate.transformer.test_bpb", tmp_path / "2.png")
    assert one.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(one).shape[:2] == (400, 600)
    assert matplotlib.image.imread(two).shape[:2] == (400, 840)
    assert not list(tmp_path.glob(".*.tmp"))


# ----------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def checkout(tmp_path_factory, mirror):
    root = tmp_path_factory.mktemp("sweep-cli")
    env = make_repo(root, mirror)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    env["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))  # no profile's API
    env.pop("PREFECT_API_URL", None)
    return root, env


def lmpipe(checkout, *args):
    root, env = checkout
    return subprocess.run([str(BIN / "lmpipe"), *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)


def test_dry_run_prints_the_points_and_what_they_share(checkout):
    proc = lmpipe(checkout, "sweep", "-S", "pretrain.train.lr=0.003,0.006", "--name", "d",
                  "--local", "1", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "  d-1  pretrain.train.lr=0.003\n  d-2  pretrain.train.lr=0.006\n" in proc.stderr
    assert "base d-base runs once: download, tokenizer, ngram, rnn" in proc.stderr
    assert "every point runs: pretrain, sft, lora, evaluate" in proc.stderr
    assert "target evaluate.transformer.test_bpb" in proc.stderr


@pytest.mark.parametrize("args, code, message", [
    (["-S", "pretrain.trian.lr=1", "--dry-run", "--local", "1"], 2,
     "d-1  pretrain.trian.lr=1  BAD (exit 2): params.yaml: Could not override "
     "'pretrain.trian.lr'"),
    (["-S", "pipeline.retries=1,2", "--local", "1"], 2, "no stage in dvc.yaml reads "
     "pipeline.retries"),
    (["-S", "tokenizer.vocab_size=320,384", "--stages", "tokenizer", "--local", "1"], 2,
     "--target: the points run neither evaluate"),
    (["-S", "seed=1", "--local", "0"], 2, "--local: must be >= 1, got 0"),
    (["-S", "seed=1", "--crash-after", "10"], 2, "--crash-after: must be >= 45"),
    (["-S", "seed=1"], 2, "--git-remote: 'origin' is neither a git remote"),
    (["-S", "seed=1", "--git-remote", "/nonexistent/repo.git"], 2, "--git-remote"),
    (["-S", "seed=1", "--git-remote", "."], 2, "no Prefect API: set PREFECT_API_URL"),
    (["-S", "seed=1", "--name", "a/b"], 2, "--name: 'a/b' is not a usable sweep name"),
    (["--local", "1"], 2, "nothing to sweep"),
])
def test_bad_sweep_input_exits_2_naming_it(checkout, args, code, message):
    proc = lmpipe(checkout, "sweep", "--name", "d", *args) if "--name" not in args \
        else lmpipe(checkout, "sweep", *args)
    assert proc.returncode == code, proc.stderr
    assert message in proc.stderr, proc.stderr


def test_a_sweep_refuses_a_modified_checkout_and_changes_nothing(checkout):
    root, _ = checkout
    params = root / "params.yaml"
    before = params.read_text()
    params.write_text(before + "# edited\n")
    try:
        for args in (["sweep", "-S", "seed=1,2", "--local", "1"], ["sweep", "apply", "x"]):
            proc = lmpipe(checkout, *args)
            assert proc.returncode == 2, proc.stderr
            assert "params.yaml" in proc.stderr and "commit" in proc.stderr
            assert params.read_text() == before + "# edited\n"
    finally:
        params.write_text(before)


def test_a_report_of_an_unknown_sweep_exits_2(checkout):
    proc = lmpipe(checkout, "sweep", "report", "nosuch")
    assert proc.returncode == 2
    assert "no sweep named 'nosuch' in MLflow experiment 'lmpipe'" in proc.stderr


# ----------------------------------------------------------------------------- MLflow
def test_the_sweep_in_mlflow_parent_children_retries_and_report(tmp_path, monkeypatch):
    from lmpipe.tracking.sweep import (
        TARGET_TAG,
        add_child,
        begin_attempt,
        mlflow_client,
        open_sweep,
        sweep_report,
    )

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("LMPIPE_ROOT", str(tmp_path))
    client = mlflow_client()
    runs = open_sweep(client, "lmpipe", "s", {"sweep.set": "pretrain.train.lr=0.003,0.006"},
                      {TARGET_TAG: "evaluate.transformer.test_bpb"})
    with pytest.raises(InputError, match="a sweep named 's' already exists"):
        open_sweep(client, "lmpipe", "s", {}, {})
    one = add_child(client, runs, "s-1", "point", {"pretrain.train.lr": "0.003"}, {})
    two = add_child(client, runs, "s-2", "point", {"pretrain.train.lr": "0.006"}, {})
    bad = add_child(client, runs, "s-3", "point", {"pretrain.trian.lr": "1"}, {},
                    error="params.yaml: Could not override 'pretrain.trian.lr'")
    assert client.get_run(bad).info.status == "FAILED"
    # a second attempt of s-1 closes the stage run its dead first attempt left RUNNING
    dead = client.create_run(runs.experiment_id, tags={"mlflow.parentRunId": one})
    assert begin_attempt(client, one, {"prefect.flow_run_id": "f2"}) == 1
    assert client.get_run(dead.info.run_id).info.status == "KILLED"
    assert client.get_run(one).data.tags["prefect.flow_run_id"] == "f2"
    for run_id, bpb in ((one, 2.5), (two, 2.4)):
        client.log_metric(run_id, "evaluate.transformer.test_bpb", bpb)
        client.set_terminated(run_id)
    report, markdown, png = sweep_report(client, "lmpipe", "s", out_dir=tmp_path / "out")
    assert [r.name for r in report.rows] == ["s-2", "s-1", "s-3"]
    assert (tmp_path / "out" / "report.md").read_text() == markdown
    assert png == tmp_path / "out" / "report.png"
    arts = {a.path for a in client.list_artifacts(runs.sweep_run_id, "sweep")}
    assert arts == {"sweep/report.md", "sweep/report.png"}

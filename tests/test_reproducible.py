"""Two clean runs of the whole pipeline give the same bytes: every out in dvc.lock compared.

Two separate git + DVC copies of the project (each with its own fresh DVC cache and MLflow
store) run `dvc repro` side by side. Every out's md5 in the two dvc.lock files must match,
except the files that carry wall-clock measurements; those are compared with exactly those
fields removed, and nothing else may differ (see WALL_CLOCK below for each field and why).

The second copy runs with its MLflow server unreachable: the stages must complete anyway
(warning once each), keep their metrics files, and `lmpipe sync-mlflow` afterwards records
the metrics in a working store. MLflow plays no part in the outputs.

The runs use the smoke profile as it ships and set nothing a user would not have: no
PYTHONHASHSEED (each process draws its own string-hash seed), no other variable.
"""

from __future__ import annotations

import json
import re
import socket
import threading
from pathlib import Path

import pytest
import yaml

from lmpipe.core.names import STAGES, TIMING_FIELD_SUFFIXES
from tests.helpers.repo import make_repo, run

# Heavy: real stages, DVC repos or a Prefect server (`make test-fast` leaves them out).
# The module's fixture runs the whole pipeline twice: its first test carries that time.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

# Fields that measure wall-clock time or memory (the one documented list, in
# lmpipe/core/names.py): removed before comparing; every other byte must be equal.
WALL_CLOCK_KEY = re.compile("(" + "|".join(re.escape(s) for s in TIMING_FIELD_SUFFIXES) + ")$")
REPORT_COLUMNS = re.compile(r"time \(s\)|tok/s")   # report.md table columns of timings
# report.md names the git commit it ran from; each scratch copy has its own first commit.
REPORT_COMMIT = re.compile(r"^- git commit: [0-9a-f]{40}$", re.M)
# "What these models are" says how long each model trained ("for 5.0 minutes", "for 40 s").
REPORT_DURATION = re.compile(r"\bfor [0-9.]+ (s|minutes)\b")


def strip_wall_clock(obj):
    if isinstance(obj, dict):
        return {k: strip_wall_clock(v) for k, v in obj.items() if not WALL_CLOCK_KEY.search(k)}
    if isinstance(obj, list):
        return [strip_wall_clock(v) for v in obj]
    return obj


def normalise_report(text: str) -> str:
    text = REPORT_COMMIT.sub("- git commit: <commit>", text)
    text = REPORT_DURATION.sub("for <t>", text)
    out, masked = [], set()
    for line in text.splitlines():
        if line.startswith("|"):
            cells = line.strip("|").split("|")
            if not set(line) <= set("|-: "):
                if any(REPORT_COLUMNS.search(c) for c in cells):     # a header row
                    masked = {i for i, c in enumerate(cells) if REPORT_COLUMNS.search(c)}
                cells = ["<t>" if i in masked and not REPORT_COLUMNS.search(c) else c
                         for i, c in enumerate(cells)]
            line = "|".join(cells)
        else:
            masked = set()
        out.append(line)
    return "\n".join(out)


def comparable(path: Path) -> str:
    """A file's content with the wall-clock fields masked."""
    if path.suffix == ".json":
        return json.dumps(strip_wall_clock(json.loads(path.read_text())), sort_keys=True)
    if path.name == "report.md":
        return normalise_report(path.read_text())
    return path.read_bytes().hex()


def files_of(root: Path, rel: str) -> list[str]:
    p = root / rel
    if p.is_file():
        return [rel]
    return sorted(f.relative_to(root).as_posix() for f in p.rglob("*") if f.is_file())


def lock_outs(root: Path) -> dict[str, str]:
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for st in lock["stages"].values() for o in st.get("outs") or []}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, mirror):
    repos = []
    for name in ("first", "second"):
        root = tmp_path_factory.mktemp(f"repro-{name}")
        env = make_repo(root, mirror)          # the smoke profile, as shipped
        repos.append((root, env))
    repos[1][1]["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{free_port()}"   # nothing listens
    results: dict[int, object] = {}

    def repro(i: int) -> None:
        root, env = repos[i]
        try:
            results[i] = run(["dvc", "repro"], root, env, timeout=1500)
        except BaseException as err:  # reported by the test
            results[i] = err

    threads = [threading.Thread(target=repro, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        if isinstance(results[i], BaseException):
            raise results[i]
    return repos, results


def test_two_clean_runs_produce_identical_outs(two_runs):
    (a, _), (b, _) = two_runs[0]
    outs_a, outs_b = lock_outs(a), lock_outs(b)
    assert set(outs_a) == set(outs_b)
    lock_a = yaml.safe_load((a / "dvc.lock").read_text())["stages"]
    assert list(lock_a) == ["params", *STAGES]
    identical = [p for p in outs_a if outs_a[p] == outs_b[p]]
    differing = [p for p in outs_a if outs_a[p] != outs_b[p]]
    # Every model, tokenizer, token file, corpus split, loss curve and plot is byte-identical.
    must_match = {"data/corpus", "data/instruct", "data/tokenizer", "data/tokens",
                  "data/models/ngram", "data/models/rnn", "data/models/transformer",
                  "data/models/sft", "data/models/lora/adapter", "data/models/lora/merged",
                  *(f"plots/{s}/loss.{ext}" for s in ("rnn", "pretrain", "sft", "lora")
                    for ext in ("csv", "png"))}
    assert must_match <= set(outs_a)
    assert sorted(must_match - set(identical)) == [], "differ between two clean runs"
    # The rest (metrics, checkpoints' state, the report) differ only in wall-clock fields.
    assert set(differing) <= {p for p in outs_a if p.startswith(("metrics/", "data/checkpoints/",
                                                                "reports"))}, differing
    for rel in differing:
        files_a, files_b = files_of(a, rel), files_of(b, rel)
        assert files_a == files_b, rel
        for f in files_a:
            assert comparable(a / f) == comparable(b / f), f"{f} differs beyond its wall-clock fields"


def test_lineage_verify_is_clean_after_both_runs(two_runs):
    for root, env in two_runs[0]:
        proc = run(["lmpipe", "lineage", "--verify"], root, env, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "every DVC out matches dvc.lock" in proc.stdout


def test_mlflow_down_stages_warn_once_and_sync_mlflow_records_the_metrics(two_runs):
    (a, env_a), (b, env_b) = two_runs[0]
    log = two_runs[1][1].stdout + two_runs[1][1].stderr
    warnings = re.findall(r"^WARNING: lmpipe: MLflow unavailable for stage '(\w+)'", log, re.M)
    # each stage warned exactly once, the params check too, and so did its pipeline run
    assert sorted(warnings) == sorted([*STAGES, "params", "pipeline"]), warnings
    for stage in STAGES:
        assert (b / "metrics" / f"{stage}.json").is_file()
    # The first run, with its store up, logged one run per stage.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{a / 'mlflow.db'}")
    exp = client.get_experiment_by_name("lmpipe")
    names = sorted(r.data.tags["dvc_stage"] for r in client.search_runs([exp.experiment_id]))
    assert names == sorted([*STAGES, "params", "pipeline"])   # one pipeline run, its stage runs

    store = f"sqlite:///{b / 'mlflow-after.db'}"
    proc = run(["lmpipe", "sync-mlflow"], b, {**env_b, "MLFLOW_TRACKING_URI": store})
    assert "logged dvc.lock" in proc.stdout
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("lmpipe")
    (synced,) = client.search_runs([exp.experiment_id], "tags.`lmpipe.sync` = 'true'")
    shipped = yaml.safe_load((b / "params.yaml").read_text())      # the whole params.yaml
    assert synced.data.params["pretrain.train.max_steps"] == str(shipped["pretrain"]["train"]["max_steps"])
    pretrain = json.loads((b / "metrics" / "pretrain.json").read_text())
    logged = synced.data.metrics
    match = [k for k in logged if k.endswith("val_bpb") and "pretrain" in k]
    assert match and logged[match[0]] == pytest.approx(pretrain["val_bpb"]), sorted(logged)[:40]


def test_sync_mlflow_replays_the_stage_runs_missed_while_mlflow_was_down(two_runs):
    """Issue 8: `lmpipe sync-mlflow` replays the missing runs from the metrics and plots files.
    The second copy ran with MLflow down, so its store lacks all eight stage runs."""
    import csv

    from mlflow.tracking import MlflowClient

    (_, _), (b, env_b) = two_runs[0]
    store = f"sqlite:///{b / 'mlflow-replay.db'}"
    run(["lmpipe", "sync-mlflow"], b, {**env_b, "MLFLOW_TRACKING_URI": store})
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("lmpipe")
    runs = {r.data.tags.get("dvc_stage"): r for r in client.search_runs([exp.experiment_id])}
    assert set(STAGES) <= set(runs), f"stage runs replayed: {sorted(k for k in runs if k)}"
    pretrain = runs["pretrain"]
    metrics = json.loads((b / "metrics" / "pretrain.json").read_text())
    assert pretrain.data.metrics["val_bpb"] == pytest.approx(metrics["val_bpb"])
    with open(b / "plots" / "pretrain" / "loss.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["train_loss"]]
    history = client.get_metric_history(pretrain.info.run_id, "train_loss")
    assert [int(m.step) for m in history] == [int(r["step"]) for r in rows]

"""Run tracking: stage runs land in MLflow with tags; MLflow being down never fails a stage."""

from __future__ import annotations

import math
import socket
import warnings

import pytest

from lmpipe.core.metric_logger import NullLogger, flatten, stage_logger
from lmpipe.core.names import PARENT_RUN_ENV
from lmpipe.core.records import write_metrics
from lmpipe.evaluation.metrics import bits_per_byte, perplexity


def test_flatten_nested_params():
    assert flatten({"a": {"b": 1, "c": {"d": "x"}}, "e": [1, 2]}) == {"a.b": 1, "a.c.d": "x", "e": [1, 2]}


def test_stage_run_records_params_metrics_tags_and_parent(project, mlflow_uri, monkeypatch):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    with stage_logger("download", experiment="test-tracking") as parent:
        parent_id = parent.run_id
    monkeypatch.setenv(PARENT_RUN_ENV, parent_id)
    with stage_logger("tokenizer", experiment="test-tracking") as log:
        log.log_params({"tokenizer": {"vocab_size": 512}})
        log.log_metrics({"val_bytes_per_token": 3.5, "skipped_text": "x"}, step=0)
        log.set_tags({"extra": "yes"})
        run_id = log.run_id
    run = client.get_run(run_id)
    assert run.info.run_name == "tokenizer"
    assert run.info.status == "FINISHED"
    assert run.data.params["tokenizer.vocab_size"] == "512"
    assert run.data.metrics == {"val_bytes_per_token": 3.5}
    tags = run.data.tags
    assert tags["mlflow.parentRunId"] == parent_id
    assert tags["dvc_stage"] == "tokenizer"
    assert tags["extra"] == "yes"
    assert {"git_commit", "git_dirty"} <= set(tags)


def test_failed_stage_marks_run_failed(project, mlflow_uri):
    from mlflow.tracking import MlflowClient

    with pytest.raises(RuntimeError):
        with stage_logger("ngram", experiment="test-tracking") as log:
            run_id = log.run_id
            raise RuntimeError("boom")
    assert MlflowClient(mlflow_uri).get_run(run_id).info.status == "FAILED"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_warns_once_and_never_raises(project, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_closed_port()}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with stage_logger("download") as log:
            log.log_params({"a": 1})
            log.log_metrics({"x": 1.0}, step=1)
            log.log_artifact(__file__)
            log.set_tags({"t": 1})
    ours = [w for w in caught if "MLflow unavailable" in str(w.message)]
    assert len(ours) == 1
    assert "metrics/download.json" in str(ours[0].message)
    assert capsys.readouterr().err.count("MLflow unavailable") == 1
    assert log.run_id is None


def test_tracking_off_gives_null_logger(monkeypatch):
    monkeypatch.setenv("LMPIPE_TRACKING", "off")
    assert isinstance(stage_logger("download"), NullLogger)


def test_bits_per_byte_by_hand():
    # 3 tokens each with p = 1/4 -> 3 * ln 4 nats = 6 bits, over 4 bytes -> 1.5 bits/byte.
    nll = 3 * math.log(4)
    assert bits_per_byte(nll, 4) == pytest.approx(1.5, abs=1e-12)
    assert perplexity(nll, 3) == pytest.approx(4.0, abs=1e-12)
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 0)


def test_write_metrics_is_sorted_json(project):
    out = write_metrics("download", {"b": 1, "a": 2.5, "c": float("nan")})
    text = (project / "metrics" / "download.json").read_text()
    assert text.index('"a"') < text.index('"b"')
    assert out["c"] == "nan"


def test_log_input_records_a_dataset_with_its_digest(project, mlflow_uri):
    import mlflow.data
    import pandas as pd
    from mlflow.tracking import MlflowClient

    ds = mlflow.data.from_pandas(pd.DataFrame({"text": ["a", "b"]}), name="train", digest="abc123")
    with stage_logger("download", experiment="test-tracking") as log:
        log.log_input(ds, context="train")
        run_id = log.run_id
    inputs = MlflowClient(mlflow_uri).get_run(run_id).inputs.dataset_inputs
    assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("train", "abc123")]
    assert inputs[0].tags[0].value == "train"


def test_flatten_numbers_lists_of_mappings_so_a_diff_names_the_field():
    flat = flatten({"download": {"files": [{"url": "a", "sha256": "b"}], "tags": ["x", "y"]}})
    assert flat == {"download.files.0.url": "a", "download.files.0.sha256": "b",
                    "download.tags": ["x", "y"]}


def test_pipeline_run_name_says_what_changed_against_head():
    from lmpipe.tracking.pipeline_run import changed_params, run_name

    head = {"ngram.order": "4", "seed": "1337", "a": "1", "b": "2", "c": "3"}
    now = {**head, "ngram.order": "5"}
    assert run_name("exp order5", changed_params(now, head)) == "exp order5 · ngram.order=5"
    assert run_name("dvc repro", {}) == "dvc repro · HEAD params"
    many = {"a": "9", "b": "9", "c": "9", "seed": "9"}
    assert run_name("lmpipe run", changed_params({**head, **many}, head)) == \
        "lmpipe run · seed=9, a=9, b=9 (+1 more)"
    assert run_name("dvc repro", {"x": "1"}, have_head=False) == "dvc repro"


def test_the_experiment_opens_on_the_training_runs_table(project, mlflow_uri):
    from mlflow.tracking import MlflowClient

    with stage_logger("download", experiment="test-kind"):
        pass
    exp = MlflowClient(mlflow_uri).get_experiment_by_name("test-kind")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"

"""Run tracking behind a small logger interface (torchtune's metric-logger protocol).

Stages and trainers call a `MetricLogger`; MLflow is one backend behind it, so no stage
scatters `mlflow.` calls. The logger knows its rank: under torchrun only rank 0 logs, so
callers log unconditionally. The metrics file a stage writes for DVC is the source of
truth: if MLflow is unreachable the logger warns once and turns into a no-op, and the stage
completes.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Protocol

from lmpipe.core.console import is_main_process
from lmpipe.core.dvc_cli import dvc_ancestor, execution_id
from lmpipe.core.git import git_state
from lmpipe.core.names import PARENT_RUN_ENV
from lmpipe.core.paths import project_root
from lmpipe.core.records import declared_deps, lock_outs, read_dvc_yaml, read_lock


class MLflowUnavailableWarning(RuntimeWarning):
    """Raised once per stage when tracking is down; the WARNING line on stderr is what users see."""


# Shown once as our own stderr line; the warnings machinery would print it a second time.
warnings.filterwarnings("ignore", category=MLflowUnavailableWarning)


class MetricLogger(Protocol):
    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_input(self, dataset, context: str) -> None: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


class NullLogger:
    """Logs nothing. Used when tracking is off, and by non-zero ranks under DDP."""

    run_id: str | None = None

    def log_params(self, params):
        pass

    def log_metrics(self, metrics, step=None):
        pass

    def log_artifact(self, path, artifact_path=None):
        pass

    def log_text(self, text, artifact_file):
        pass

    def log_input(self, dataset, context):
        pass

    def set_tags(self, tags):
        pass

    def close(self, status="FINISHED"):
        pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close("FAILED" if exc_type else "FINISHED")
        return False


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; a list of mappings is numbered ('files.0.url'), so
    MLflow's "show diff only" names the one field that changed; other lists stay whole."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        elif isinstance(v, list) and v and all(isinstance(i, Mapping) for i in v):
            for i, item in enumerate(v):
                out.update(flatten(item, f"{key}.{i}."))
        else:
            out[key] = v
    return out


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def dvc_lock_deps(stage: str, root: Path | None = None) -> dict[str, str]:
    """md5 of each dep of `stage`, as dvc.lock records it, keyed `dvc_dep.<path>`.

    A dep produced by an upstream stage takes the md5 of that stage's out (already current
    when this stage starts); otherwise this stage's own previous lock entry is used.
    """
    try:
        lock = read_lock(root, required=False)
        spec = read_dvc_yaml(root).get(stage) or {}
    except Exception:  # an unreadable dvc.lock must not fail the stage's tracking
        return {}
    outs = lock_outs(lock)
    own = {d["path"]: d.get("md5", "") for d in (lock.get(stage) or {}).get("deps") or []}
    result = {}
    for path in declared_deps(spec) or list(own):
        md5 = outs.get(path.rstrip("/")) or own.get(path)
        if md5:
            result[f"dvc_dep.{path}"] = md5
    return result


EXECUTION_TAG = "lmpipe.execution"   # names the `dvc repro` / `dvc exp run` a run belongs to
# The experiment tag MLflow's UI reads to pick its first page: the training runs table, not
# the GenAI overview it guesses for an untagged experiment (traces, token usage: all empty).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def ensure_experiment(client, experiment: str) -> str:
    """The id of `experiment`, created when missing (artifacts beside the store, or under
    LMPIPE_ARTIFACT_URI for a server), and tagged to open on the training runs table."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        artifacts = (project_root() / "mlartifacts").resolve().as_uri()
        uri = client.tracking_uri
        if not uri.startswith(("sqlite:", "file:")) and os.environ.get("LMPIPE_ARTIFACT_URI"):
            artifacts = os.environ["LMPIPE_ARTIFACT_URI"]
        elif not uri.startswith(("sqlite:", "file:")):
            artifacts = None  # let the server choose (e.g. --default-artifact-root s3://...)
        try:
            exp_id = client.create_experiment(experiment, artifact_location=artifacts,
                                              tags=dict([EXPERIMENT_KIND]))
        except Exception:  # created concurrently by another stage
            exp = client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id
    else:
        exp_id = exp.experiment_id
    if exp is not None and exp.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
        client.set_experiment_tag(exp_id, *EXPERIMENT_KIND)
    return exp_id


def execution_parent(client, experiment_id: str) -> str | None:
    """The pipeline run of the `dvc repro` / `dvc exp run` this process runs under, if the
    `params` stage opened one (lmpipe/tracking/execution.py); None outside DVC."""
    proc = dvc_ancestor()
    if proc is None:
        return None
    found = client.search_runs([experiment_id], f"tags.`{EXECUTION_TAG}` = '{execution_id(proc)}'",
                               max_results=1)
    return found[0].info.run_id if found else None


class MLflowLogger:
    """One MLflow run per stage execution; a child of the flow's run when one is given."""

    def __init__(self, stage: str, experiment: str = "lmpipe", tracking_uri: str | None = None,
                 attach: str | None = None):
        """A new run named `stage`, or with `attach` the existing run of that id."""
        self.stage = stage
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._attach = attach
        self._client = None
        self._warned = False
        # Fail fast instead of MLflow's default minutes of HTTP retries when a server is down.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        try:
            self._start(experiment, tracking_uri or default_tracking_uri())
        except Exception as err:  # tracking must never fail the stage
            self._warn(err)

    # -- plumbing
    def _warn(self, err: BaseException) -> None:
        if not self._warned:
            self._warned = True
            msg = f"lmpipe: MLflow unavailable for stage {self.stage!r} ({type(err).__name__}: {err}); "
            msg += f"continuing without it, metrics stay in metrics/{self.stage}.json"
            print(f"WARNING: {msg}", file=sys.stderr)
            warnings.warn(msg, MLflowUnavailableWarning, stacklevel=3)
        self._client = None

    def _guard(self, fn, *args, **kwargs):
        if self._client is None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # tracking must never fail the stage
            self._warn(err)
            return None

    def _start(self, experiment: str, uri: str) -> None:
        logging.getLogger("alembic").setLevel(logging.WARNING)
        from mlflow.tracking import (
            MlflowClient,  # deferred: mlflow takes seconds to import
        )

        client = MlflowClient(tracking_uri=uri)
        exp_id = ensure_experiment(client, experiment)
        if self._attach:
            client.get_run(self._attach)   # fails here, once, when the store is down
            self._client, self.run_id, self.experiment_id = client, self._attach, exp_id
            return
        tags = {"mlflow.runName": self.stage, "lmpipe.stage": self.stage, "dvc_stage": self.stage}
        parent = os.environ.get(PARENT_RUN_ENV) or execution_parent(client, exp_id)
        if parent:
            tags["mlflow.parentRunId"] = parent
        tags.update(git_state())
        tags.update(dvc_lock_deps(self.stage))
        run = client.create_run(exp_id, run_name=self.stage, tags=tags)
        self._client = client
        self.run_id = run.info.run_id
        self.experiment_id = exp_id

    @property
    def client(self):
        """The MlflowClient of this run (None when tracking is down), for reading runs back."""
        return self._client

    # -- the interface
    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param  # deferred: mlflow takes seconds to import

        flat = flatten(params)
        items = [Param(k, str(v)[:6000]) for k, v in sorted(flat.items())]
        for i in range(0, len(items), 100):
            self._guard(self._client_call, "log_batch", self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric  # deferred: mlflow takes seconds to import

        ts = int(time.time() * 1000)
        items = [
            Metric(k, float(v), ts, step or 0)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        for i in range(0, len(items), 500):
            self._guard(self._client_call, "log_batch", self.run_id, metrics=items[i : i + 500])

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._guard(self._client_call, "log_artifact", self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._guard(self._client_call, "log_text", self.run_id, text, artifact_file)

    def log_input(self, dataset, context: str) -> None:
        """Record an `mlflow.data` dataset (e.g. a split) as an input of this run."""

        def _do():
            from mlflow.entities import DatasetInput, InputTag  # deferred: as above

            tag = InputTag(key="mlflow.data.context", value=context)
            entity = DatasetInput(dataset=dataset._to_mlflow_entity(), tags=[tag])
            self._client.log_inputs(self.run_id, datasets=[entity])

        self._guard(_do)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self._guard(self._client_call, "set_tag", self.run_id, k, str(v))

    def close(self, status: str = "FINISHED") -> None:
        if self._client is not None and self.run_id:
            self._guard(self._client_call, "set_terminated", self.run_id, status)
        self._client = None

    def _client_call(self, name: str, *args, **kwargs):
        return getattr(self._client, name)(*args, **kwargs)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close("FAILED" if exc_type else "FINISHED")
        return False


def pandas_dataset(df, *, name: str, digest: str, source: str):
    """An `mlflow.data` dataset for `log.log_input(...)`, or None if MLflow cannot build one.

    `digest` should be the DVC md5 of the file the frame was read from, so MLflow and DVC
    name the same bytes (MLflow's digest column holds at most 36 characters: md5 fits).
    """
    try:
        import mlflow.data  # deferred: mlflow takes seconds to import; tracking may be off

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "source can be interpreted in multiple ways"
            return mlflow.data.from_pandas(df, source=source, name=name, digest=digest)
    except Exception as err:  # tracking must never fail the stage
        print(f"WARNING: lmpipe: could not describe dataset {name!r} for MLflow: {err}", file=sys.stderr)
        return None


def stage_logger(stage: str, experiment: str = "lmpipe") -> MLflowLogger | NullLogger:
    """The logger a stage uses: MLflow on rank 0, nothing on the other ranks of a torchrun
    job. LMPIPE_TRACKING=off disables tracking entirely."""
    if os.environ.get("LMPIPE_TRACKING", "").lower() in ("off", "0", "false", "none"):
        return NullLogger()
    if not is_main_process():
        return NullLogger()
    return MLflowLogger(stage, experiment=experiment)
